mkdir -p /etc/xsockd /run/xsock
cat > /etc/xsockd/x.conf <<EOC
[daemon]
rundir = "/run/xsock"
peers = [0]
backend = "xen"
EOC
python3 -m xsockd.daemon --config /etc/xsockd/x.conf -v > /tmp/xsockd.log 2>&1 &
i=0; while ! xenstore-read data/dom0-ready >/dev/null 2>&1 && [ $i -lt 900 ]; do sleep 1; i=$((i+1)); done
i=0; while [ ! -S /run/xsock/0.sock ] && [ $i -lt 400 ]; do sleep 1; i=$((i+1)); done; echo "DOMU-XSOCKD: socket wait $i s"; ps | grep -v "\[" | tail -8 | sed "s/^/DOMU-PS: /"
python3 - <<EOP
from xsockd.demo import stream_through
try:
    sent, back, t = stream_through("/run/xsock/0.sock", 16 << 20, progress=False)
    print("XSOCK-STEP stream", "PASS" if sent == back else "FAIL", f"16 MiB each way in {t:.1f} s")
except Exception as e:
    print("XSOCK-STEP stream FAIL", repr(e))
EOP
sed 's/^/DOMU-XSOCKD: /' /tmp/xsockd.log | tail -25
