# The GPU tests on the GPU machine (repo root): wheels, full-size random weights and the 720p
# avatar from device_env.sh (the first-frame test uses that prepared store: the machine's
# OpenCV 5 has no Haar cascades). Output to $OUT/gpu_tests.txt, its summary on stdout.
# LIMIT (default 500 s) leaves a 600 s device call room for the set-up; -v names each test as
# it runs, so a run cut short still says which test it was in. K picks tests by name (pytest -k).
. bench/scripts/device_env.sh
export LIPSTREAM_TEST_AVATARS_DIR=/tmp/avatars LIPSTREAM_TEST_MODELS_DIR=/tmp/models
timeout "${LIMIT:-500}" python3 -m pytest -v -m gpu -p no:cacheprovider --durations=10 tests ${K:+-k "$K"} ${PYTEST_ARGS:-} \
    >"${OUT:-/tmp}/gpu_tests.txt" 2>&1
echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "${OUT:-/tmp}/gpu_tests.txt" | tail -15
