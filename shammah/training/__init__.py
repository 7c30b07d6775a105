"""Training: data formats, losses (SFT/DPO/KTO/ranking), the trainer and its progress events.

Shared by ``shammah train``, the chat's background learning and the HTTP jobs.
Nothing here writes to the terminal directly: progress goes to callbacks.
"""
