"""``lora-export build``: a TOML recipe (base model, adapters, artifacts, verification) turned into a
verified, content-cached, atomically published DIST folder with a manifest."""
