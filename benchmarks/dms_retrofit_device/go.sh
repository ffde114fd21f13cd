#!/bin/bash
# On the device, in the repo root: join + convert + check + time (once), then train until this call's deadline.
T0=$(date +%s)
mkdir -p /tmp/p
[ -d /tmp/base ] || cp -r .gpu_upload/base /tmp/base
for d in .gpu_upload/g*; do [ -f $d/piece ] && cp -n $d/piece /tmp/p/${d##*/}; done
ls /tmp/p | tr '\n' ' '; echo
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/base/whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/base/pkg:/tmp/site PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 HF_HUB_OFFLINE=1
[ -f /tmp/texts-2048.json ] || gunzip -c /tmp/base/texts-2048.json.gz > /tmp/texts-2048.json
if [ ! -f /tmp/steptime.json ]; then
  python3 /tmp/base/prep.py /tmp/p /tmp/base /tmp/qwen cuda 2048 2>&1 | grep -v -E "it/s\]|s/it\]"
  rc=${PIPESTATUS[0]}
  if [ $rc = 4 ]; then python3 /tmp/base/prep.py /tmp/p /tmp/base /tmp/qwen cuda 1024; rc=$?; fi
  [ $rc = 0 ] || { echo "prep failed rc $rc"; exit $rc; }
fi
cat /tmp/steptime.json; echo
python3 /tmp/base/drive.py /tmp/qwen /tmp/texts-2048.json /tmp/runs "$OUT" $((T0 + ${BUDGET:-565}))
rc=$?
nvidia-smi --query-gpu=memory.used --format=csv,noheader
ls -R "$OUT"
exit $rc
