"""`tuneforge convert-config`: XTuner and InternEvo `.py` configs as tuneforge YAML (see `run.py`)."""
