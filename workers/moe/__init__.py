"""Mixture-of-experts models built from dense experts (mergekit-moe's recipe): the dense models' MLPs
become the experts of each layer, everything else comes from the base model, and each layer's router is
set from hidden states of prompts that describe what each expert is for."""
