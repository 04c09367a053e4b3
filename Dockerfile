# overlayfs-inetsk node image: CRIU 4.2.1 built from Debian's source package, and the daemon.
# The entrypoint serves a view in the foreground (docs/docker.md):
#   docker run --privileged --device /dev/fuse --network host \
#     -v /srv/ckpt:/srv/ckpt:ro -v /run/overlayfs-inetsk:/run/overlayfs-inetsk:rshared \
#     overlayfs-inetsk /srv/ckpt/web /run/overlayfs-inetsk/views/web --map local=auto
# Built here with `podman build --runtime runc` (no Docker engine on these machines; notes in
# docs/docker.md); checked by reading in tests/test_docs.py::test_dockerfile_by_reading.

ARG DEBIAN=debian:12-slim

FROM ${DEBIAN} AS build
ARG CRIU_DEB_VERSION=4.2.1-1
ARG CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
RUN apt-get update && apt-get install -y --no-install-recommends \
      build-essential pkg-config libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler \
      protobuf-compiler libnl-3-dev libnl-route-3-dev libnet1-dev libcap-dev libaio-dev \
      libbsd-dev libgnutls28-dev libnftables-dev uuid-dev libdrm-dev libfuse3-dev \
      python3-dev python3-venv python3-pip xz-utils ca-certificates dpkg-dev \
      debian-archive-keyring \
    && rm -rf /var/lib/apt/lists/*
# deb-src ONLY for sid (a binary sid entry would upgrade libc), on the base image's own mirror
COPY scripts/apt-mirror.sh /tmp/apt-mirror.sh
RUN bash -c ". /tmp/apt-mirror.sh && criu_src_entry" > /etc/apt/sources.list.d/criu-src.sources \
    && apt-get update \
    && mkdir -p /src && cd /src \
    && apt-get source --download-only --tar-only "criu=${CRIU_DEB_VERSION}" \
    && echo "${CRIU_SHA256}  criu_4.2.1.orig.tar.xz" | sha256sum -c - \
    && mkdir criu && tar -xJf criu_4.2.1.orig.tar.xz -C criu --strip-components=1 \
    && make -C criu -j"$(nproc)" criu && make -C criu lib \
    && make -C criu PREFIX=/usr/local DESTDIR=/out install-criu \
    && echo "__version__ = '4.2.1'" > criu/crit/crit/version.py
# the venv with pycriu, crit and the dependencies pyproject.toml names, before the tree is
# copied: a change to the tree alone rebuilds neither CRIU nor these (pyfuse3 compiles)
COPY pyproject.toml /deps/pyproject.toml
RUN python3 -c 'import tomllib; print("\n".join(["setuptools>=77", *tomllib.load(open("/deps/pyproject.toml", "rb"))["project"]["dependencies"]]))' > /deps/requirements.txt \
    && python3 -m venv /opt/overlayfs-inetsk/venv \
    && /opt/overlayfs-inetsk/venv/bin/pip install --no-cache-dir /src/criu/lib /src/criu/crit \
    && /opt/overlayfs-inetsk/venv/bin/pip install --no-cache-dir -r /deps/requirements.txt
COPY . /app
# the CRIU plugin (docs/plugin.md), against the same CRIU source tree; the DaemonSet's init
# container installs it from /usr/local/lib/overlayfs-inetsk (`plugin install`)
RUN make -C /app/plugin CRIU_SRC=/src/criu OUT=/out/plugin
RUN /opt/overlayfs-inetsk/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation /app

FROM ${DEBIAN}
RUN apt-get update && apt-get install -y --no-install-recommends \
      libprotobuf-c1 libprotobuf32 libnl-3-200 libnl-route-3-200 libnet1 libcap2 libaio1 \
      libbsd0 libgnutls30 libnftables1 libuuid1 libdrm2 fuse3 libfuse3-3 iproute2 iptables \
      python3 util-linux procps \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/usr/local /usr/local
COPY --from=build /opt/overlayfs-inetsk/venv /opt/overlayfs-inetsk/venv
COPY --from=build /out/plugin/overlayfs_inetsk_plugin.so /usr/local/lib/overlayfs-inetsk/
ENV PATH=/opt/overlayfs-inetsk/venv/bin:$PATH
ENTRYPOINT ["/opt/overlayfs-inetsk/venv/bin/overlayfs-inetsk", "mount", "--foreground"]
