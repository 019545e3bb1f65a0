"""B4B building blocks: LSH coverage, cost function, noise, per-user transforms, user-state store.

Pure maths and storage; no Lightning here (see ``rsgm.lightning_modules.b4b_*``).
"""
