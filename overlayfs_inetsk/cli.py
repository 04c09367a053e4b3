def main() -> int:
    print("overlayfs-inetsk")
    return 0
