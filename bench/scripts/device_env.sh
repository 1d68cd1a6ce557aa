# Source on the GPU machine (repo root): the carried wheels (.whl/, see README "Benchmarks")
# go to /tmp/site; full-size random weights and an avatar under /tmp (AVATARS_FROM: a
# prepared store to copy, else a 720p synthetic avatar).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | grep -v -i "warning" | tail -3
export PYTHONPATH=/tmp/site:$PWD
export LIPSTREAM_MODELS_DIR=/tmp/models LIPSTREAM_AVATARS_DIR=/tmp/avatars
if [ ! -f /tmp/models/.complete ]; then
    python3 -m lipstream models make-random --size full >/tmp/make-random.log 2>&1 && touch /tmp/models/.complete
fi
if [ -n "${AVATARS_FROM:-}" ] && [ ! -d /tmp/avatars ]; then
    cp -r "$AVATARS_FROM" /tmp/avatars  # e.g. .devdata/avatars, prepared on the CPU
fi
if [ ! -d /tmp/avatars ]; then
    python3 - <<'PY'
import dataclasses, os
from avatars.store import AvatarStore
from bench.gpu.measure import synthetic_avatar
store = AvatarStore(os.environ["LIPSTREAM_AVATARS_DIR"])
av = synthetic_avatar(25)  # 720p, 25 frames, boxes without a face detector
store.save(dataclasses.replace(av, id=store.new_id(), name="synthetic720p", latents=None))
PY
fi
