"""Trust and safety: watermarks and provenance of generated content, detection of
generated content, and moderation of prompts and outputs."""
