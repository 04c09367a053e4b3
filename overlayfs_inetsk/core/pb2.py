"""pycriu's generated modules for files.img and protobuf, loaded when entries.py first needs
them (entries.generated()): the byte pass (bytepass.py), the plugin's CLI route, needs
neither, and they were about 18 ms of its start (docs/design.md, "The plugin's CLI route").

Pure: imports only.
"""

from __future__ import annotations

import posixpath
import sys
from typing import Any


def load() -> tuple[Any, Any, Any, type[Exception], type[Exception]]:
    """fdinfo_pb2, sk_inet_pb2, the head class of file_entry, DecodeError, EncodeError."""
    from google.protobuf.message import DecodeError, EncodeError

    fdinfo_pb2, sk_inet_pb2 = _generated()
    return fdinfo_pb2, sk_inet_pb2, _head_class(), DecodeError, EncodeError


def _generated() -> tuple[Any, Any]:
    """pycriu's fdinfo_pb2 and sk_inet_pb2, without importing the pycriu.images package
    when nothing else did: its __init__ loads every generated module it has (about 100,
    most of our start-up time); these two need about 25. pycriu's generated modules import
    each other by top-level name (pycriu.images puts its own dir on sys.path), so they are
    loaded the same way; a later `import pycriu.images` reuses them."""
    if "pycriu.images" not in sys.modules:
        import importlib.util

        spec = importlib.util.find_spec("pycriu")  # finds the package, does not run it
        locations = spec.submodule_search_locations if spec is not None else None
        if locations:
            images_dir = posixpath.join(list(locations)[0], "images")
            sys.path.append(images_dir)
            try:
                import fdinfo_pb2  # type: ignore[import-not-found]
                import sk_inet_pb2  # type: ignore[import-not-found]

                return fdinfo_pb2, sk_inet_pb2
            except ImportError:
                pass
            finally:
                sys.path.remove(images_dir)
    from pycriu.images import fdinfo_pb2, sk_inet_pb2

    return fdinfo_pb2, sk_inet_pb2


def _head_class() -> Any:
    """file_entry's two required fields alone (`type` 1, `id` 2): decoding a non-inet entry
    with it costs a third of decoding it whole, keeps protobuf's rule that the LAST value
    of a field wins (as CRIU's protobuf-c does), and tells a missing field."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    u32 = descriptor_pb2.FieldDescriptorProto.TYPE_UINT32
    req = descriptor_pb2.FieldDescriptorProto.LABEL_REQUIRED
    fdp = descriptor_pb2.FileDescriptorProto(name="overlayfs_inetsk_head.proto",
                                             package="overlayfs_inetsk", syntax="proto2")
    msg = fdp.message_type.add(name="FileEntryHead")
    msg.field.add(name="type", number=1, type=u32, label=req)
    msg.field.add(name="id", number=2, type=u32, label=req)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("overlayfs_inetsk.FileEntryHead"))
    return cls
