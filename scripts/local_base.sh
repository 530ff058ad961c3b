#!/usr/bin/env bash
# A base image for machines that reach no image registry (only Debian's package mirror): Debian
# bookworm minbase with python3 + python3-venv, made by mmdebstrap and imported into buildah's
# local storage as localhost/batchmask-base:bookworm-nodoc. The tarball is kept in
# ${XDG_CACHE_HOME:-~/.cache}/batchmask-image/ between runs. Prints the image name.
#   scripts/local_base.sh && scripts/build_image.sh --base localhost/batchmask-base:bookworm-nodoc --wheels
# Needs: buildah, mmdebstrap (apt-get install buildah mmdebstrap), root.
set -euo pipefail
name=localhost/batchmask-base:bookworm-nodoc  # the tag changes with what the tarball holds
if buildah inspect --type image "$name" >/dev/null 2>&1; then echo "$name"; exit 0; fi
dir=${XDG_CACHE_HOME:-$HOME/.cache}/batchmask-image
tar=$dir/base-bookworm-nodoc.tar
if [[ ! -s $tar ]]; then
  mkdir -p "$dir"
  part=$dir/base-bookworm-nodoc.part.tar  # mmdebstrap picks the format from the name: keep .tar last
  # No manuals, translations or docs (the licences stay): ~50 MB a container never reads.
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    bookworm "$part" >&2
  mv "$part" "$tar"
fi
c=$(buildah from scratch)
trap 'buildah rm "$c" >/dev/null' EXIT
buildah add --quiet "$c" "$tar" / >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/sh "$c"
buildah commit --quiet "$c" "$name" >/dev/null
echo "$name"
