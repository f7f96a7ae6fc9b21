# The domU's agent, which runs the corpus's domU steps when dom0 asks.
python3 /scenario/xsproof.py domu
