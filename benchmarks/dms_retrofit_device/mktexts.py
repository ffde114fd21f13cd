import json, sys, time
sys.path.insert(0, '/work/main/.gpu_upload/pkg')
import transformers
from vllm_kvcompress.offline.dms_train import _texts
tok = transformers.AutoTokenizer.from_pretrained('/root/.cache/vllm_kvcompress/models/qwen2.5-coder-0.5b')
t = time.time()
seq, count = int(sys.argv[1]), int(sys.argv[2])
out = _texts(tok, seq, count, seed=0)
print(len(out), set(map(len, out)), time.time() - t)
json.dump(out, open(sys.argv[3], 'w'))
