"""Kiln's model layer: the decoder, its sharding, decoding and sampling, tokenizers, conversion.

Importing it changes no process state; the CPU process settings live in train/cpu_tuning.py.
"""
