"""Demo-only data: the procedural image domains, parallel multilingual captions, tokenizer building."""
