SUMMARY = "The kiosk's Tiny-SD model folder"
HOMEPAGE = "https://example.invalid/diffusionx"
SECTION = "graphics"
DESCRIPTION = "The ONNX folder the kiosk loads (onnx/export.py, onnx/quantize.py): text encoder, \
UNet, VAE decoder and encoder, optional tiny VAE decoder, tokenizer, scheduler config and the \
diffusionx.json manifest with every file's sha256, installed read-only."

# DIFFUSIONX_MODEL_DIR: the folder to install. The default is the committed tiny int8 test model
# (random weights: it runs the whole system and makes abstract pictures); a product image sets
# the folder it exported from real weights, and that model's licence, e.g. in local.conf:
#   DIFFUSIONX_MODEL_DIR = "/srv/models/tiny-sd-int8"
#   DIFFUSIONX_MODEL_LICENSE = "CreativeML-OpenRAIL-M"
#   DIFFUSIONX_MODEL_LIC_FILES_CHKSUM = "file://${DIFFUSIONX_MODEL_DIR}/LICENSE;md5=..."
# The licence file's path must be absolute (as here): a relative file:// path is read from S,
# which is empty in this recipe (it has no SRC_URI), not from DIFFUSIONX_MODEL_DIR.
DIFFUSIONX_MODEL_DIR ??= "${DIFFUSIONX_TOPDIR}/onnx/fixtures/tiny-sd-int8-weights"
DIFFUSIONX_MODEL_LICENSE ??= "Apache-2.0"
DIFFUSIONX_MODEL_LIC_FILES_CHKSUM ??= "file://${DIFFUSIONX_TOPDIR}/LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"
LICENSE = "${DIFFUSIONX_MODEL_LICENSE}"
LIC_FILES_CHKSUM = "${DIFFUSIONX_MODEL_LIC_FILES_CHKSUM}"

# The folder is read in place by do_install (never made the recipe's S, which bitbake cleans),
# and every file of it is part of the task's signature: a changed model rebuilds the package,
# an unchanged one comes from the shared state cache.
S = "${UNPACKDIR}"
do_install[file-checksums] += "${DIFFUSIONX_MODEL_DIR}:True"
do_configure[noexec] = "1"
do_compile[noexec] = "1"

inherit allarch

python do_install() {
    import hashlib, json, os, shutil

    src = d.getVar("DIFFUSIONX_MODEL_DIR")
    dest = d.expand("${D}${datadir}/diffusionx/model")
    manifest_path = os.path.join(src, "diffusionx.json")
    if not os.path.isfile(manifest_path):
        bb.fatal("%s has no diffusionx.json: not a model folder from onnx/export.py" % src)
    with open(manifest_path) as f:
        manifest = json.load(f)
    files = manifest.get("files") or {}
    if not files:
        bb.fatal("%s lists no files" % manifest_path)
    # Exactly the files the manifest lists, each checked against its sha256: an image never
    # ships a model the kiosk would refuse at start-up.
    for name, expected in sorted(files.items()):
        path = os.path.join(src, name)
        if os.path.isabs(name) or ".." in name.split("/"):
            bb.fatal("%s: manifest entry %s leaves the folder" % (manifest_path, name))
        if not os.path.isfile(path):
            bb.fatal("%s: %s is listed in the manifest but missing" % (src, name))
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != expected:
            bb.fatal("%s: %s does not match its manifest sha256" % (src, name))
        os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
        shutil.copyfile(path, os.path.join(dest, name))
        os.chmod(os.path.join(dest, name), 0o644)
    shutil.copyfile(manifest_path, os.path.join(dest, "diffusionx.json"))
    os.chmod(os.path.join(dest, "diffusionx.json"), 0o644)
    # The noise level predictor's weights, when the folder ships them (docs/predictor.md).
    predictor = os.path.join(src, "predictor.json")
    if os.path.isfile(predictor):
        shutil.copyfile(predictor, os.path.join(dest, "predictor.json"))
        os.chmod(os.path.join(dest, "predictor.json"), 0o644)
}

FILES:${PN} += "${datadir}/diffusionx/model"
