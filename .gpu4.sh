timeout 170 python -m pytest -q parity_tests/test_documents.py -k gpu -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warning | tail -12
timeout 100 python benchmarks/bench_doc_attention.py --preset small --kernels swa_cudnn_plain swa_blocked_docs mla_cudnn_plain mla_docs 2>&1 | grep "^|"
python benchmarks/bench_train.py --steps 10 --batch 8 --case-timeout 150 --cases jax:small:2048:bf16 jax:small:2048:bf16+doc_mask=true jax:base:2048:bf16 jax:base:2048:bf16+doc_mask=true --out $OUT/bench_doc_jax.json --md $OUT/bench_doc_jax.md 2>&1 | tail -5
