"""Bridges to the Hugging Face ecosystem: HF PEFT's adapter format and in-place acceleration of HF PEFT models."""
