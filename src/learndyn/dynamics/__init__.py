"""Explaining learning dynamics: Δ log π = −η · A · K · G to first order (Ren & Sutherland, Eq. 5).

residuals  G = ∂L/∂z per loss (SFT, DPO, IPO, hinge, GRPO's loss types), written out by hand
groups     GRPO's update batch: completions per prompt, rewards, TRL's advantages, tokens
updates    Δθ from a gradient under an optimizer rule (SGD, Adam, AdamW, RMSprop), split by cause
step       one LLM step explained: predicted vs actual change of every probe response, per position
sequences  token sequences and prompt-sharing batches for the explainer's passes
positions  where the explainer's per-position rows go: kept in memory or streamed to Parquet
classify   the exact classification case: A, K (eNTK) and G as C×C matrices
toy        the linear softmax model that shows the squeezing effect
"""
