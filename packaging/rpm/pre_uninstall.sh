# Kloigos %preun: %systemd_preun written out: on erase (not upgrade), disable and stop.
if [ "$1" -eq 0 ]; then
	systemctl --no-reload disable --now kloigos.socket kloigos.service kloigos-nftables.service >/dev/null 2>&1 || :
fi
