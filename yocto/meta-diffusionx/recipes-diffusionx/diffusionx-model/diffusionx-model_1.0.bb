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

# The sizes (height x width) the kiosk's configuration renders at: the factory kiosk.toml's
# 256x256. When the manifest lists checked_resolutions, each must be among them, as the kiosk's
# start-up requires; a product whose bundles render at other sizes lists them here.
DIFFUSIONX_MODEL_SIZES ??= "256x256"

python do_install() {
    import hashlib, json, math, os, shutil

    # The kiosk's own rules (appliance/engine/src/folder.rs, ModelFolder::open, and
    # Pipeline::prepare's resolution check): an image never ships a model the kiosk would refuse
    # at start-up. tools/xtask/tests/yocto.rs keeps these lists equal to the engine's.
    REQUIRED = [
        "model_index.json",
        "text_encoder/model.onnx",
        "unet/model.onnx",
        "vae_decoder/model.onnx",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ]
    OPTIONAL = [
        "tiny_vae_decoder/model.onnx",
        "tokenizer/tokenizer_config.json",
    ]
    PRECISIONS = ["f32", "int8"]

    src = d.getVar("DIFFUSIONX_MODEL_DIR")
    dest = d.expand("${D}${datadir}/diffusionx/model")
    manifest_path = os.path.join(src, "diffusionx.json")
    if not os.path.isfile(manifest_path):
        bb.fatal("%s has no diffusionx.json: not a model folder from onnx/export.py" % src)
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != 1:
        bb.fatal("%s: format %r is not supported (the kiosk reads format 1)"
                 % (manifest_path, manifest.get("format")))
    if manifest.get("precision") not in PRECISIONS:
        bb.fatal("%s: precision %r is not one of %s"
                 % (manifest_path, manifest.get("precision"), ", ".join(PRECISIONS)))
    scale = manifest.get("vae_scaling_factor")
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
            and math.isfinite(scale) and scale > 0):
        bb.fatal("%s: vae_scaling_factor is %r, expected a number above 0"
                 % (manifest_path, scale))
    files = manifest.get("files") or {}
    if not files:
        bb.fatal("%s lists no files" % manifest_path)
    for name in sorted(files):
        parts = name.split("/")
        if os.path.isabs(name) or any(p in ("", ".", "..") for p in parts):
            bb.fatal("%s: lists %r, which is not a relative path inside the folder"
                     % (manifest_path, name))
    for name in REQUIRED:
        if not os.path.isfile(os.path.join(src, name)):
            bb.fatal("%s: %s is missing" % (src, name))
        if name not in files:
            bb.fatal("%s: does not list %s" % (manifest_path, name))
    for name in OPTIONAL:
        if os.path.isfile(os.path.join(src, name)) and name not in files:
            bb.fatal("%s: does not list %s, which the folder has (re-export the folder, or "
                     "remove the file)" % (manifest_path, name))
    checked = [list(r) for r in manifest.get("checked_resolutions") or []]
    for size in (d.getVar("DIFFUSIONX_MODEL_SIZES") or "").split():
        height, width = (int(v) for v in size.split("x"))
        if checked and [height, width] not in checked:
            bb.fatal("%s: checked_resolutions %s does not hold %dx%d, which the kiosk renders "
                     "at (DIFFUSIONX_MODEL_SIZES): export it with --check %dx%d"
                     % (manifest_path, checked, height, width, height, width))
    # Exactly the files the manifest lists, each a regular file checked against its sha256.
    for name, expected in sorted(files.items()):
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            bb.fatal("%s: %s is listed in the manifest but missing" % (src, name))
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != expected.lower():
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
