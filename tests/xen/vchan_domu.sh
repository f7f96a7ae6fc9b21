# The domU's agent, as in the proof.
python3 /scenario/xsproof.py domu
