"""The file names of a PEFT adapter folder, as PEFT and the original LLaVA code write them."""

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
INDEX_NAME = "adapter_model.safetensors.index.json"  # sharded weights (Hugging Face convention)
BIN_NAME = "adapter_model.bin"
NON_LORA_NAME = "non_lora_trainables.bin"  # original LLaVA checkpoints: the mm_projector
RECORD_NAME = "robustmerge.json"  # this library's merge record
MODEL_CONFIG_NAME = "config.json"  # original LLaVA LoRA folders: the LlavaConfig, read by load_pretrained_model
