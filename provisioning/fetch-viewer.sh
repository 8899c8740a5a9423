#!/bin/sh
# Install the prebuilt OHIF v3 viewer (npm package @ohif/app, MIT) into
# appliance/web/static/viewer/, the one place the viewer comes from.
#
#   provisioning/fetch-viewer.sh              # npm pack from the registry
#   VIEWER_TARBALL=ohif-app-3.13.2.tgz provisioning/fetch-viewer.sh   # offline
#
# The tarball's SHA-256 is pinned below, so an offline bundle can carry the
# .tgz and the install still proves it is the file we tested. The unpacked
# build is pruned of what an appliance does not need (source maps, the `ort/`
# AI runtime, the microscopy viewer: ~204 MB -> ~49 MB) and re-based from `/`
# to `/viewer/<version>/`, because the app's pages own `/` and because a
# versioned prefix lets browsers keep every file of the build for good. Our own app-config.js is
# served by appliance/web/viewer.py, so the packaged one is removed.
set -eu

VERSION="3.13.2"
SHA256="b189d3963bfc58e9394a9db8c7be75d07beb029ec211dbb126d47b62969dd3f1"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${VIEWER_DEST:-$HERE/appliance/web/static/viewer}"
PREFIX="/viewer/$VERSION/"  # versioned: every file under it can be cached for good

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ -n "${VIEWER_TARBALL:-}" ]; then
  cp "$VIEWER_TARBALL" "$work/ohif.tgz"
else
  if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing npm (Debian) to fetch the viewer"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  fi
  command -v npm >/dev/null 2>&1 || { echo "error: npm is needed to fetch the viewer (apt-get install npm)" >&2; exit 1; }
  (cd "$work" && npm pack --silent "@ohif/app@$VERSION" >/dev/null)
  mv "$work"/ohif-app-"$VERSION".tgz "$work/ohif.tgz"
fi
echo "$SHA256  $work/ohif.tgz" | sha256sum -c --quiet - || {
  echo "error: @ohif/app tarball does not match the pinned SHA-256 for $VERSION" >&2; exit 1; }

tar -xzf "$work/ohif.tgz" -C "$work"
dist="$work/package/dist"
[ -f "$dist/index.html" ] || { echo "error: no dist/index.html in the @ohif/app package" >&2; exit 1; }

# Prune: source maps, the onnx AI runtime, the microscopy viewer, demo-only files.
find "$dist" -name '*.map' -delete
rm -rf "$dist/ort" "$dist/dicom-microscopy-viewer"
rm -f "$dist/app-config.js" "$dist/_redirects" "$dist/_headers" "$dist/serve.json" "$dist/google.js"

# Re-base absolute URLs from / to /viewer/ (webpack public path, page links, CSS fonts).
sed -i -e "s#window.PUBLIC_URL=\"/\"#window.PUBLIC_URL=\"$PREFIX\"#" \
       -e "s#\(src\|href\)=\"/#\1=\"$PREFIX#g" "$dist/index.html"
grep -q "window.PUBLIC_URL=\"$PREFIX\"" "$dist/index.html" || {
  echo "error: index.html layout changed: cannot set PUBLIC_URL" >&2; exit 1; }
for f in "$dist"/*.js; do
  sed -i "s#__webpack_require__.p = \"/\";#__webpack_require__.p = \"$PREFIX\";#" "$f"
done
grep -q "__webpack_require__.p = \"$PREFIX\"" "$dist"/app.bundle.*.js || {
  echo "error: app bundle layout changed: cannot set the webpack public path" >&2; exit 1; }
for f in "$dist"/*.css; do
  sed -i "s#url(/#url($PREFIX#g" "$f"
done
echo "$VERSION" > "$dist/OHIF_VERSION"
# gzip twins of the large text/wasm files: served as is when the browser accepts gzip,
# so a reader on a thin link downloads ~5.5 MB instead of ~25 MB, with no CPU per request.
find "$dist" -type f \( -name '*.js' -o -name '*.css' -o -name '*.wasm' -o -name '*.json' \) \
  -size +8k -exec gzip -9 -k -n {} +
# brotli twins too (browsers send "br" over HTTPS): ~30 % smaller than gzip -9 on this
# build (5.5 MB -> ~3.9 MB for what a first open downloads: ~2.5 s less at 5 Mbit/s).
# Node's zlib does it wherever npm fetched the package; without node, gzip only.
if command -v node >/dev/null 2>&1; then
  find "$dist" -name '*.gz' | sed 's/\.gz$//' > "$work/twins"
  node -e '
    const fs = require("fs"), zlib = require("zlib");
    const files = fs.readFileSync(process.argv[1], "utf8").split("\n").filter(Boolean);
    let left = files.length;
    for (const f of files) {
      const data = fs.readFileSync(f);
      zlib.brotliCompress(data, { params: {
        [zlib.constants.BROTLI_PARAM_QUALITY]: 11,
        [zlib.constants.BROTLI_PARAM_LGWIN]: 24,
        [zlib.constants.BROTLI_PARAM_SIZE_HINT]: data.length } }, (err, out) => {
        if (err) { console.error(f, err); process.exit(1); }
        if (out.length < fs.statSync(f + ".gz").size) fs.writeFileSync(f + ".br", out);
        if (--left === 0) process.exit(0);
      });
    }' "$work/twins"
else
  echo "note: node not found, so no brotli twins (gzip ones only)"
fi

# Swap in atomically enough for a static folder: build beside, then rename.
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.new" "$DEST.old"
mv "$dist" "$DEST.new"
[ -d "$DEST" ] && mv "$DEST" "$DEST.old"
mv "$DEST.new" "$DEST"
rm -rf "$DEST.old"
echo "OHIF $VERSION installed in $DEST ($(du -sh "$DEST" | cut -f1))"
