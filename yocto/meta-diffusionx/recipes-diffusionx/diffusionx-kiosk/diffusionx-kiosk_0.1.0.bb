SUMMARY = "DiffusionX kiosk firmware"
DESCRIPTION = "The kiosk: visitor sessions with live previews on the CPU (Tiny-SD on tract), \
cloud refinement over QUIC with a local fallback, session reports over MQTT."
HOMEPAGE = "https://example.invalid/diffusionx"
SECTION = "graphics"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# Built from a commit of the DiffusionX repository this layer lives in, never from its working
# tree, so an image names exactly the source it holds: by default the commit the layer itself is
# at (commit before building; uncommitted changes are not in the image). A release may pin
# another (SRCREV:pn-diffusionx-kiosk), and DIFFUSIONX_GIT may point at a mirror where the
# layer is used outside the repository (yocto/README.md).
DIFFUSIONX_GIT ??= "git://${DIFFUSIONX_TOPDIR};protocol=file"
SRC_URI = "${DIFFUSIONX_GIT};nobranch=1;destsuffix=diffusionx \
           file://kiosk.toml \
           file://diffusionx-provision \
           file://diffusionx-provision.service \
           file://diffusionx-kiosk-image.conf \
           file://99-diffusionx.rules \
           "
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

do_install:append() {
    # The unit from the source tree (docs/kiosk.md), and what the image adds to it.
    install -d ${D}${systemd_system_unitdir}/diffusionx-kiosk.service.d
    install -m 0644 ${S}/appliance/kiosk/systemd/diffusionx-kiosk.service \
        ${D}${systemd_system_unitdir}/
    install -m 0644 ${UNPACKDIR}/diffusionx-kiosk-image.conf \
        ${D}${systemd_system_unitdir}/diffusionx-kiosk.service.d/image.conf
    install -m 0644 ${UNPACKDIR}/diffusionx-provision.service ${D}${systemd_system_unitdir}/
    install -d ${D}${sbindir}
    install -m 0755 ${UNPACKDIR}/diffusionx-provision ${D}${sbindir}/

    # The factory configuration; the one in force lives on the data partition.
    install -d ${D}${datadir}/diffusionx
    install -m 0644 ${UNPACKDIR}/kiosk.toml ${D}${datadir}/diffusionx/kiosk.toml
    install -d ${D}${sysconfdir}
    ln -s ${localstatedir}/lib/diffusionx/etc ${D}${sysconfdir}/diffusionx

    install -d ${D}${nonarch_base_libdir}/udev/rules.d
    install -m 0644 ${UNPACKDIR}/99-diffusionx.rules ${D}${nonarch_base_libdir}/udev/rules.d/
}

FILES:${PN} += "${systemd_system_unitdir} ${datadir}/diffusionx ${nonarch_base_libdir}/udev/rules.d"
RDEPENDS:${PN} += "diffusionx-model"
