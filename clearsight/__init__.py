"""clearsight: hallucination mitigation for vision-language models."""
