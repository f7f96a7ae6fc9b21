mkdir -p /etc/xsockd /run/xsock
cat > /etc/xsockd/x.conf <<EOC
[daemon]
rundir = "/run/xsock"
peers = [$DOMU]
default_service = "echo"
backend = "xen"

[services.echo]
socket = "/run/echo.sock"
EOC
python3 -c '
import socket, threading
srv = socket.socket(socket.AF_UNIX); srv.bind("/run/echo.sock"); srv.listen(64)
def echo(c):
    with c:
        while d := c.recv(262144):
            c.sendall(d)
        c.shutdown(socket.SHUT_WR)
while True:
    threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
' > /tmp/echo.log 2>&1 &
# Start the Python processes one after the other: two starting at once under TCG crashed one.
i=0; while [ ! -S /run/echo.sock ] && [ $i -lt 400 ]; do sleep 1; i=$((i+1)); done
python3 -m xsockd.daemon --config /etc/xsockd/x.conf -v > /tmp/xsockd.log 2>&1 &
i=0; while { [ ! -S /run/xsock/$DOMU.sock ] || [ ! -S /run/echo.sock ]; } && [ $i -lt 400 ]; do sleep 1; i=$((i+1)); done
if [ -S /run/xsock/$DOMU.sock ] && [ -S /run/echo.sock ]; then step dom0-xsockd PASS
else step dom0-xsockd FAIL; tail -20 /tmp/xsockd.log /tmp/echo.log; fi
xenstore-write /local/domain/$DOMU/data/dom0-ready 1
wait_domu stream 900 || step domu-stream-timeout FAIL
sed 's/^/DOM0-XSOCKD: /' /tmp/xsockd.log | tail -25
