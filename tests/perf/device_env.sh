# Sourced by the device-call scripts (gpu_call.sh, gpu_quant_check.sh, gpu_tp_check.sh) from the checkout's root:
# installs the carried wheels of .whl/ (hydra-core, omegaconf, rouge_score, ...: gpu_quant_check.sh's header says how
# to make them) into /tmp/site and points Python at them, the checkout and the carried .shared/.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=8
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
[ -d .shared ] && export EF_SHARED_DIR=$PWD/.shared
