"""Measuring models: windowed perplexity (ppl.py) on the documented texts (ppl_suite.py), zero-shot
accuracy through stock lm_eval on local data (zeroshot.py, zeroshot_data.py), and the shared JSON
results format (results.py)."""
