'use strict';
'require baseclass';
'require rpc';

const callStatus = rpc.declare({
	object: 'osocks.luci',
	method: 'status'
});

let previous = null;

return baseclass.extend({
	title: _('SOCKS proxy (osocks)'),

	load() {
		return L.resolveDefault(callStatus(), null);
	},

	render(status) {
		if (!status || !status.sessions) {
			previous = null;

			return E('p', { 'id': 'osocks-overview' }, E('em', _('osocks is not running')));
		}

		let up = 0, down = 0;

		if (previous && previous.pid == status.pid && status.uptime > previous.uptime) {
			const seconds = status.uptime - previous.uptime;
			up = Math.max(0, (status.bytes.up - previous.up) / seconds);
			down = Math.max(0, (status.bytes.down - previous.down) / seconds);
		}

		previous = { pid: status.pid, uptime: status.uptime, up: status.bytes.up, down: status.bytes.down };

		const rows = [
			[ _('Running'), _('yes, on %s').format(status.listeners.join(', ') || _('no address yet')) ],
			[ _('Live sessions'), String(status.sessions.live) ],
			[ _('Client → destination'), '%1024.2mB/s'.format(up) ],
			[ _('Destination → client'), '%1024.2mB/s'.format(down) ]
		];

		return E('table', { 'class': 'table', 'id': 'osocks-overview' }, rows.map(r => E('tr', { 'class': 'tr' }, [
			E('td', { 'class': 'td left', 'width': '33%' }, r[0]),
			E('td', { 'class': 'td left' }, r[1])
		])));
	}
});
