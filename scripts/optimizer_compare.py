"""Our low-precision AdamW vs torchao's and bitsandbytes' on CPU, same gradients (docs/precision.md,
"The library comparison"). Usage:
  PYTHONPATH=. python scripts/optimizer_compare.py --out benchmarks/optimizer-comparison"""
from cascade.perf.optimizer_compare import main

if __name__ == "__main__":
    main()
