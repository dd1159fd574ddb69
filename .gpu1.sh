set -x
nvidia-smi --query-gpu=name,memory.total --format=csv
python -c "import jax, torch; print(jax.__version__, torch.__version__, jax.devices())"
git log --oneline -1 2>/dev/null
timeout 240 python -m pytest -q -x parity_tests/test_documents.py -k gpu -p no:cacheprovider 2>&1 | tail -30
python benchmarks/bench_train.py --steps 10 --batch 8 --case-timeout 170 --cases jax:small:2048:bf16 jax:small:2048:bf16+doc_mask=true jax:base:2048:bf16 jax:base:2048:bf16+doc_mask=true --out $OUT/bench_doc_jax.json --md $OUT/bench_doc_jax.md 2>&1 | tail -12
