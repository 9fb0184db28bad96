SUMMARY = "DiffusionX kiosk image"
DESCRIPTION = "Boots straight into the kiosk: systemd, the kiosk firmware and its model on a \
read-only root filesystem, configuration and state on a data partition."
LICENSE = "MIT"

inherit core-image

IMAGE_INSTALL = "\
    packagegroup-core-boot \
    diffusionx-kiosk \
    diffusionx-model \
    ca-certificates \
    tzdata \
    "

# A power cut can only hit the data partition, whose writers (session records, the report
# outbox, provisioning) write, sync and rename; the system itself is never written.
IMAGE_FEATURES += "read-only-rootfs"
# Production images have no login; DIFFUSIONX_DEBUG = "1" (local.conf) adds an SSH server,
# root login without a password and the tools to look around, for bring-up only.
IMAGE_FEATURES += "${@'ssh-server-dropbear allow-empty-password empty-root-password allow-root-login tools-debug' if d.getVar('DIFFUSIONX_DEBUG') == '1' else ''}"

# Only English, no documentation, no package manager on the device: a small image whose
# content is exactly its recipes.
IMAGE_LINGUAS = ""

# Partitions for machines that write a disk image with wic (Raspberry Pi, QEMU): boot, the
# read-only root, and the data partition mounted at /var/lib/diffusionx.
WKS_FILE = "diffusionx-kiosk.wks.in"
DIFFUSIONX_DATA_SIZE ??= "2048M"
