SUMMARY = "DiffusionX kiosk firmware"
DESCRIPTION = "The kiosk: visitor sessions with live previews on the CPU (Tiny-SD on tract), \
cloud refinement over QUIC with a local fallback, session reports over MQTT."
HOMEPAGE = "https://example.invalid/diffusionx"
SECTION = "graphics"
# LICENSE is the DiffusionX code's own, and not the whole binary's: `kiosk` also links,
# statically, about 280 crates of diffusionx-kiosk-crates.inc under their own licences (mostly
# MIT and Apache-2.0, also ISC, BSD-2-Clause, BSD-3-Clause, Unicode-3.0, Zlib, MPL-2.0, BSL-1.0,
# 0BSD and others; `cargo metadata` gives each crate's SPDX expression), which this recipe does
# not declare. So the image's licence manifest (COPY_LIC_MANIFEST, yocto/kas/common.yml) lists
# the kiosk as Apache-2.0 only and is not a complete compliance record for it: a product's
# compliance file must add the crates (each one's licence text is in its folder under
# ${CARGO_VENDORING_DIRECTORY} after do_fetch).
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# Built from a commit of the DiffusionX repository this layer lives in, never from its working
# tree, so an image names exactly the source it holds: the commit the layer itself is at (commit
# before building; uncommitted changes are not in the image). DIFFUSIONX_GIT may point at a
# mirror where the layer is used outside the repository (yocto/README.md).
# The layer and SRCREV must be the same commit: the crate list below is this layer's, the
# Cargo.lock cargo builds with (--frozen) is the fetched commit's, and any crate change between
# two commits fails the build. To build a release, check out its tag and build from there;
# never point SRCREV:pn-diffusionx-kiosk at another commit.
# Everything the package installs comes from that commit, the files of this recipe's files/
# folder included (not from the layer's working tree): a factory kiosk.toml, provisioning
# script or udev rule never differs from the binary's commit.
DIFFUSIONX_GIT ??= "git://${DIFFUSIONX_TOPDIR};protocol=file"
SRC_URI = "${DIFFUSIONX_GIT};nobranch=1;destsuffix=diffusionx"
PV = "0.1.0+git"
SRCREV ??= "${@bb.process.run(['git', '-C', d.getVar('DIFFUSIONX_TOPDIR'), 'rev-parse', 'HEAD'])[0].strip()}"
S = "${UNPACKDIR}/diffusionx"

# Every crate of Cargo.lock, fetched by bitbake with its checksum (written by
# `cargo xtask yocto-crates`; a test fails while it differs from the lockfile).
require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

# The workspace is built with --frozen from the fetched crates; only the kiosk binary.
CARGO_BUILD_FLAGS:append = " --package diffusionx-kiosk --bin kiosk"

USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system input"
USERADD_PARAM:${PN} = "--system --user-group --home-dir ${localstatedir}/lib/diffusionx --no-create-home \
                       --shell /sbin/nologin kiosk"

SYSTEMD_SERVICE:${PN} = "diffusionx-kiosk.service diffusionx-provision.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

# This recipe's files/ folder in the fetched commit.
DIFFUSIONX_FILES = "${S}/yocto/meta-diffusionx/recipes-diffusionx/diffusionx-kiosk/files"

do_install:append() {
    # The unit from the source tree (docs/kiosk.md), and what the image adds to it.
    install -d ${D}${systemd_system_unitdir}/diffusionx-kiosk.service.d
    install -m 0644 ${S}/appliance/kiosk/systemd/diffusionx-kiosk.service \
        ${D}${systemd_system_unitdir}/
    install -m 0644 ${DIFFUSIONX_FILES}/diffusionx-kiosk-image.conf \
        ${D}${systemd_system_unitdir}/diffusionx-kiosk.service.d/image.conf
    install -m 0644 ${DIFFUSIONX_FILES}/diffusionx-provision.service ${D}${systemd_system_unitdir}/
    install -d ${D}${sbindir}
    install -m 0755 ${DIFFUSIONX_FILES}/diffusionx-provision ${D}${sbindir}/

    # The factory configuration; the one in force lives on the data partition.
    install -d ${D}${datadir}/diffusionx
    install -m 0644 ${DIFFUSIONX_FILES}/kiosk.toml ${D}${datadir}/diffusionx/kiosk.toml
    install -d ${D}${sysconfdir}
    ln -s ${localstatedir}/lib/diffusionx/etc ${D}${sysconfdir}/diffusionx
    # The data partition's mount point (wic/diffusionx-kiosk.wks.in): on the read-only root
    # nothing can create it at boot.
    install -d ${D}${localstatedir}/lib/diffusionx

    install -d ${D}${nonarch_base_libdir}/udev/rules.d
    install -m 0644 ${DIFFUSIONX_FILES}/99-diffusionx.rules ${D}${nonarch_base_libdir}/udev/rules.d/
}

FILES:${PN} += "${systemd_system_unitdir} ${datadir}/diffusionx ${nonarch_base_libdir}/udev/rules.d \
                 ${localstatedir}/lib/diffusionx"
RDEPENDS:${PN} += "diffusionx-model"
