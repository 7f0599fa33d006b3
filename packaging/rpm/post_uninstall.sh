# Kloigos %postun: %systemd_postun_with_restart written out. On erase, the reload drops the
# units' drop-ins: the generator left with the package (/etc/kloigos/host.json, like the
# inventory, stays for a reinstall).
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -ge 1 ]; then
	# Upgrade: restart a running service so it runs the new binary.
	systemctl try-restart kloigos.service >/dev/null 2>&1 || :
fi
