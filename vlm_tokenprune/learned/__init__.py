"""Learned token selectors (ATP-LLaVA, CoViPAL): their weight files and modules."""
