'use strict';
'require view';
'require poll';
'require rpc';
'require ui';
'require dom';

const callStatus = rpc.declare({
	object: 'osocks.luci',
	method: 'status'
});

const callSessions = rpc.declare({
	object: 'osocks.luci',
	method: 'sessions',
	expect: { sessions: [] }
});

const callDisconnect = rpc.declare({
	object: 'osocks.luci',
	method: 'disconnect',
	params: [ 'id' ]
});

const POLL_SECONDS = 3;
const GRAPH_POINTS = 100;  /* five minutes of samples */
const GRAPH_WIDTH = 600, GRAPH_HEIGHT = 160;
const SVG = 'http://www.w3.org/2000/svg';

function bytes(n) {
	return '%1024.2mB'.format(n || 0);
}

function rate(n) {
	return '%1024.2mB/s'.format(n || 0);
}

function duration(seconds) {
	return '%t'.format(Math.floor(seconds || 0));
}

function svgElement(name, attributes) {
	const element = document.createElementNS(SVG, name);

	for (const key in attributes)
		element.setAttribute(key, attributes[key]);

	return element;
}

function row(label, value, id) {
	return E('tr', { 'class': 'tr' }, [
		E('td', { 'class': 'td left', 'width': '33%' }, label),
		E('td', { 'class': 'td left', 'id': id || null }, value)
	]);
}

return view.extend({
	/* rates come from two samples: bytes moved between them over the time between them */
	previous: null,
	history: null,

	sample(status) {
		const now = { pid: status.pid, uptime: status.uptime, up: status.bytes.up, down: status.bytes.down };
		const last = this.previous;
		let rates = { up: 0, down: 0 };

		if (last && last.pid == now.pid && now.uptime > last.uptime) {
			const seconds = now.uptime - last.uptime;
			rates = {
				up: Math.max(0, (now.up - last.up) / seconds),
				down: Math.max(0, (now.down - last.down) / seconds)
			};
		}

		this.previous = now;
		this.history.push(rates);

		if (this.history.length > GRAPH_POINTS)
			this.history.shift();

		return rates;
	},

	/* lines in an SVG stretched to the page's width; the scale's labels over it in HTML, unstretched */
	renderGraph() {
		const svg = svgElement('svg', {
			'id': 'osocks-graph', 'width': '100%', 'height': GRAPH_HEIGHT,
			'viewBox': '0 0 %d %d'.format(GRAPH_WIDTH, GRAPH_HEIGHT), 'preserveAspectRatio': 'none',
			'style': 'display:block'
		});
		const labels = [];

		for (const percent of [ 25, 50, 75 ]) {
			const y = GRAPH_HEIGHT * (1 - percent / 100);
			svg.appendChild(svgElement('line', { 'x1': 0, 'x2': GRAPH_WIDTH, 'y1': y, 'y2': y, 'style': 'stroke:#ddd;stroke-width:1', 'vector-effect': 'non-scaling-stroke' }));
			labels.push(E('small', {
				'id': 'osocks-label-%d'.format(percent),
				'style': 'position:absolute;left:4px;top:%dpx;color:#888'.format(y - 16)
			}, '-'));
		}

		svg.appendChild(svgElement('polyline', { 'id': 'osocks-line-down', 'points': '', 'style': 'fill:none;stroke:#00c;stroke-width:2', 'vector-effect': 'non-scaling-stroke' }));
		svg.appendChild(svgElement('polyline', { 'id': 'osocks-line-up', 'points': '', 'style': 'fill:none;stroke:#c60;stroke-width:2', 'vector-effect': 'non-scaling-stroke' }));

		return E('div', { 'style': 'position:relative;border:1px solid #ccc;background:#fff;height:%dpx'.format(GRAPH_HEIGHT) }, [ svg, ...labels ]);
	},

	updateGraph(graph) {
		const peak = 1.25 * Math.max(1024, ...this.history.map(r => Math.max(r.up, r.down)));  /* headroom above the top */
		const step = GRAPH_WIDTH / (GRAPH_POINTS - 1);
		const offset = GRAPH_POINTS - this.history.length;

		for (const direction of [ 'up', 'down' ]) {
			const points = this.history.map((r, i) =>
				'%.1f,%.1f'.format((offset + i) * step, GRAPH_HEIGHT - r[direction] / peak * (GRAPH_HEIGHT - 2)));

			graph.querySelector('#osocks-line-' + direction).setAttribute('points', points.join(' '));
		}

		for (const percent of [ 25, 50, 75 ])
			graph.querySelector('#osocks-label-' + percent).firstChild.data = rate(peak * percent / 100);
	},

	renderSummary(status, rates) {
		const s = status.sessions;

		return E('table', { 'class': 'table', 'id': 'osocks-summary' }, [
			row(_('Running'), _('yes, pid %d, version %s, for %s').format(status.pid, status.version, duration(status.uptime)), 'osocks-state'),
			row(_('Listening on'), status.listeners.length ? status.listeners.join(', ') : _('nothing (no address yet)'), 'osocks-listeners'),
			row(_('Sessions'), _('%d live, %d at most, %d in all').format(s.live, s.peak, s.total), 'osocks-live'),
			row(_('Refused'), _('%d over the session limit, %d by client rules, %d failed logins').format(s.refused, s.denied, status.auth_failures)),
			row(_('Client → destination'), _('%s, now %s').format(bytes(status.bytes.up), rate(rates.up)), 'osocks-up'),
			row(_('Destination → client'), _('%s, now %s').format(bytes(status.bytes.down), rate(rates.down)), 'osocks-down'),
			row(_('UDP'), _('%d associations, %d datagrams, %s').format(status.udp.associations, status.udp.datagrams, bytes(status.udp.bytes)))
		]);
	},

	renderWorkers(status) {
		if (!Array.isArray(status.workers))
			return E([]);

		return E('div', { 'class': 'cbi-section' }, [
			E('h3', _('Workers (%d restarts)').format(status.worker_restarts || 0)),
			E('table', { 'class': 'table', 'id': 'osocks-workers' }, [
				E('tr', { 'class': 'tr table-titles' }, [
					E('th', { 'class': 'th' }, _('PID')),
					E('th', { 'class': 'th' }, _('Live sessions')),
					E('th', { 'class': 'th' }, _('Sessions in all')),
					E('th', { 'class': 'th' }, _('Running for'))
				]),
				...status.workers.map(w => E('tr', { 'class': 'tr' }, w.error != null ? [
					E('td', { 'class': 'td' }, w.pid != null ? String(w.pid) : '-'),
					E('td', { 'class': 'td', 'colspan': 3 }, _('not answering: %s').format(w.error))
				] : [
					E('td', { 'class': 'td' }, String(w.pid)),
					E('td', { 'class': 'td' }, String(w.live)),
					E('td', { 'class': 'td' }, String(w.total)),
					E('td', { 'class': 'td' }, duration(w.uptime))
				]))
			])
		]);
	},

	renderSessions(sessions, workers) {
		const titles = [ _('Client'), _('Destination'), _('User'), _('State'), _('Sent'), _('Received'), _('Age') ];

		if (workers)
			titles.push(_('Worker'));

		const table = E('table', { 'class': 'table', 'id': 'osocks-sessions' }, [
			E('tr', { 'class': 'tr table-titles' }, [ ...titles.map(t => E('th', { 'class': 'th' }, t)), E('th', { 'class': 'th' }) ])
		]);

		sessions.sort((a, b) => b.age - a.age);

		for (const session of sessions) {
			const cells = [
				session.client, session.destination || '-', session.user || '-', session.state,
				bytes(session.bytes_up), bytes(session.bytes_down), duration(session.age)
			];

			if (workers)
				cells.push(String(session.worker));

			table.appendChild(E('tr', { 'class': 'tr', 'data-id': session.id }, [
				...cells.map(c => E('td', { 'class': 'td' }, c)),
				E('td', { 'class': 'td right' }, E('button', {
					'class': 'btn cbi-button cbi-button-remove', 'name': 'osocks-disconnect',
					'click': ui.createHandlerFn(this, 'handleDisconnect', session.id)
				}, _('Disconnect')))
			]));
		}

		if (!sessions.length)
			table.appendChild(E('tr', { 'class': 'tr placeholder' }, E('td', { 'class': 'td' }, E('em', _('No live sessions')))));

		return table;
	},

	handleDisconnect(id) {
		return callDisconnect(id).then(answer => {
			if (answer && answer.error)
				ui.addNotification(null, E('p', _('Could not disconnect: %s').format(answer.error)), 'warning');

			return this.refresh();
		});
	},

	refresh() {
		return Promise.all([ callStatus(), L.resolveDefault(callSessions(), []) ]).then(([ status, sessions ]) => {
			if (!status || !status.sessions)
				throw new Error(status && status.error ? status.error : _('no status'));

			const rates = this.sample(status);

			dom.content(this.summary, this.renderSummary(status, rates));
			dom.content(this.workers, this.renderWorkers(status));
			dom.content(this.sessions, this.renderSessions(sessions, Array.isArray(status.workers)));
			this.updateGraph(this.graph);
		}).catch(err => {
			this.previous = null;
			dom.content(this.summary, E('p', { 'id': 'osocks-state' },
				E('em', _('osocks is not running (%s).').format(err.message || err))));
			dom.content(this.workers, E([]));
			dom.content(this.sessions, E([]));
		});
	},

	render() {
		this.history = [];
		this.summary = E('div', E('em', { 'class': 'spinning' }, _('Collecting data...')));
		this.workers = E('div');
		this.sessions = E('div');
		this.graph = this.renderGraph();

		const view = E('div', { 'class': 'cbi-map' }, [
			E('h2', _('osocks status')),
			E('div', { 'class': 'cbi-map-descr' }, _('Live figures of the SOCKS5 server, every %d seconds.').format(POLL_SECONDS)),
			E('div', { 'class': 'cbi-section' }, this.summary),
			E('div', { 'class': 'cbi-section' }, [
				E('h3', _('Throughput, last five minutes')),
				this.graph,
				E('div', {}, [
					E('span', { 'style': 'border-bottom:2px solid #c60' }, _('client → destination')), ' ',
					E('span', { 'style': 'border-bottom:2px solid #00c' }, _('destination → client'))
				])
			]),
			this.workers,
			E('div', { 'class': 'cbi-section' }, [ E('h3', _('Live sessions')), this.sessions ])
		]);

		return this.refresh().then(() => {
			poll.add(L.bind(this.refresh, this), POLL_SECONDS);

			return view;
		});
	},

	handleSaveApply: null,
	handleSave: null,
	handleReset: null
});
