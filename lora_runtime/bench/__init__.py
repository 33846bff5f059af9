"""The benchmark harness (`lora-runtime bench`): side-by-side timings and memory of this
runtime, HF PEFT and the frozen base. Nothing else in the package imports it."""
