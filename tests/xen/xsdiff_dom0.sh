# The differential run alone, then the wire bisect (xenstored may stop answering after it):
# python tests/xen/harness.py xsdiff.  The Xen proof runs the same corpus (tests/xen/proof_*.sh).
python3 /scenario/xsproof.py xsdiff
