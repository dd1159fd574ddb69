set -x
timeout 150 python benchmarks/bench_doc_attention.py --preset small --kernels swa_cudnn_plain swa_blocked_docs swa_blocked_docs_nosink mla_cudnn_plain mla_pallas_docs_b64 --out $OUT/doc_attn_small.json 2>&1 | grep -v '^{' | tail -8
timeout 150 python -m pytest -q -x parity_tests/test_documents.py -k gpu -p no:cacheprovider 2>&1 | tail -8
python benchmarks/bench_train.py --steps 10 --batch 8 --case-timeout 170 --cases jax:small:2048:bf16 jax:small:2048:bf16+doc_mask=true jax:base:2048:bf16 jax:base:2048:bf16+doc_mask=true --out $OUT/bench_doc_jax.json --md $OUT/bench_doc_jax.md 2>&1 | tail -5
for k in mla_cudnn_packed_docs_m16 mla_cudnn_packed_docs_m16_padv mla_cudnn_packed_docs_m64_padv; do timeout 60 python benchmarks/bench_doc_attention.py --preset small --kernels $k 2>&1 | grep "^{" ; done
