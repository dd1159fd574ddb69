set -x
timeout 200 python benchmarks/bench_doc_attention.py --preset small --batch 8 --seq 2048 --out $OUT/doc_attn_small.json 2>&1 | grep -v '^{' | tail -14
timeout 150 python benchmarks/bench_doc_attention.py --preset base --batch 8 --seq 2048 --kernels swa_cudnn_plain swa_blocked_docs swa_blocked_docs_nosink mla_cudnn_plain mla_cudnn_packed_docs_m16 mla_cudnn_packed_docs_m64 mla_pallas_docs_b64 --out $OUT/doc_attn_base.json 2>&1 | grep -v '^{' | tail -12
python benchmarks/bench_train.py --steps 10 --batch 8 --case-timeout 200 --cases torch:small:2048:bf16 torch:small:2048:bf16+doc_mask=true --out $OUT/bench_doc_torch.json 2>&1 | tail -4
