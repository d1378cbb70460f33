"""``spactor convert``: our checkpoints to Hugging Face T5 (:mod:`.hf_export`) and back (:mod:`.hf_import`)."""
