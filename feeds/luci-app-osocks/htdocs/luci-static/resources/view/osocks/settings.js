'use strict';
'require view';
'require form';
'require rpc';
'require ui';
'require dom';
'require tools.widgets as widgets';
'require osocks.validate as check';

/* osocks' methods as LuCI calls them (object osocks.luci: LuCI's /ubus adds a
 * ubus_rpc_session argument that the plain object osocks does not take). */
const callReload = rpc.declare({
	object: 'osocks.luci',
	method: 'reload'
});

const callHashPassword = rpc.declare({
	object: 'osocks.luci',
	method: 'hash_password',
	params: [ 'password' ]
});

/* Save & Apply reloads the page once the change is applied; the reload's
 * answer is asked for again (a no-op when it already ran) on the new page. */
const APPLIED_FLAG = 'osocks-applied';

function userName(entry) {
	return entry.split(':')[0];
}

function isHashed(entry) {
	const secret = entry.slice(entry.indexOf(':') + 1);

	return secret.indexOf('$pbkdf2-sha256$') == 0 || secret.indexOf('$scrypt$') == 0;
}

/* The `user` list: names only on screen.  A new password is hashed by osocks
 * (ubus hash_password) before it is put in the form: UCI never sees it. */
const UserList = ui.AbstractElement.extend({
	__init__(entries, options) {
		this.entries = L.toArray(entries).slice();  /* a copy: the form compares it with what UCI has */
		this.options = options;
	},

	render() {
		const node = E('div', { 'id': this.options.id, 'class': 'osocks-users' }, [
			E('div', { 'class': 'osocks-user-rows' }),
			E('div', { 'class': 'control-group' }, [
				E('input', {
					'type': 'text', 'class': 'cbi-input-text', 'name': 'osocks-new-user',
					'placeholder': _('User name'), 'autocomplete': 'off'
				}),
				E('input', {
					'type': 'password', 'class': 'cbi-input-password', 'name': 'osocks-new-password',
					'placeholder': _('Password'), 'autocomplete': 'new-password'
				}),
				E('button', {
					'class': 'btn cbi-button cbi-button-add', 'name': 'osocks-add-user',
					'click': ui.createHandlerFn(this, 'handleAdd')
				}, _('Add user'))
			]),
			E('div', { 'class': 'osocks-user-error', 'style': 'color:#c00' })
		]);

		this.node = node;
		this.drawRows();
		this.setChangeEvents(node, 'osocks-users-change');
		dom.bindClassInstance(node, this);

		return node;
	},

	drawRows() {
		const rows = this.entries.map((entry, index) => E('div', { 'class': 'osocks-user', 'data-user': userName(entry) }, [
			E('strong', {}, userName(entry)), ' ',
			isHashed(entry) ? E('span', {}, _('password stored as a hash'))
				: E('span', { 'class': 'label warning' }, _('password stored in clear text: add the user again to hash it')), ' ',
			E('button', {
				'class': 'btn cbi-button cbi-button-remove', 'name': 'osocks-remove-user',
				'click': ui.createHandlerFn(this, 'handleRemove', index)
			}, _('Remove'))
		]));

		dom.content(this.node.querySelector('.osocks-user-rows'),
			rows.length ? rows : E('em', {}, _('No users: every client may connect without logging in.')));
	},

	changed() {
		this.drawRows();
		this.node.dispatchEvent(new CustomEvent('osocks-users-change', { bubbles: true }));
	},

	showError(message) {
		dom.content(this.node.querySelector('.osocks-user-error'), message || '');
	},

	handleAdd(ev) {
		ev.preventDefault();

		const nameInput = this.node.querySelector('input[name="osocks-new-user"]');
		const passwordInput = this.node.querySelector('input[name="osocks-new-password"]');
		const name = nameInput.value.trim(), password = passwordInput.value;
		const invalid = [ check.userName(name), check.password(password) ].filter(r => r !== true);

		if (invalid.length)
			return this.showError(invalid[0]);

		return callHashPassword(password).then(reply => {
			if (!reply || typeof(reply.hash) != 'string')
				throw new Error((reply && reply.error) || _('no answer'));

			passwordInput.value = '';
			nameInput.value = '';
			this.showError('');
			this.entries = this.entries.filter(entry => userName(entry) != name);
			this.entries.push(name + ':' + reply.hash);
			this.changed();
		}).catch(err => {
			this.showError(_('osocks could not hash the password: %s').format(err.message || err));
		});
	},

	handleRemove(index, ev) {
		ev.preventDefault();
		this.entries = this.entries.filter((entry, i) => i != index);
		this.changed();
	},

	getValue() {
		return this.entries.slice();
	},

	setValue(entries) {
		this.entries = L.toArray(entries).slice();
		this.drawRows();
	}
});

const UserOption = form.Value.extend({
	renderWidget(section_id, option_index, cfgvalue) {
		return new UserList(cfgvalue, { id: this.cbid(section_id) }).render();
	},

	cfgvalue(section_id, set_value) {
		return L.toArray(this.super('cfgvalue', Array.prototype.slice.call(arguments)));
	},

	formvalue(section_id) {
		const widget = this.getUIElement(section_id);

		return widget ? widget.getValue() : this.cfgvalue(section_id);
	},

	textvalue(section_id) {
		return this.cfgvalue(section_id).map(userName).join(', ');
	}
});

function showReloadAnswer(answer) {
	if (answer && answer.error)
		ui.addNotification(_('osocks refused the new settings'), [
			E('p', _('osocks keeps running with its previous settings. It said:')),
			E('pre', { 'class': 'osocks-reload-error' }, answer.error)
		], 'danger');
}

function validator(fn) {
	return function(section_id, value) {
		return fn(value == null ? '' : String(value));
	};
}

return view.extend({
	load() {
		if (sessionStorage.getItem(APPLIED_FLAG) == null)
			return Promise.resolve(null);

		sessionStorage.removeItem(APPLIED_FLAG);

		return L.resolveDefault(callReload(), null);
	},

	render(reloadAnswer) {
		let m, s, o;

		showReloadAnswer(reloadAnswer);
		document.addEventListener('uci-applied', () => sessionStorage.setItem(APPLIED_FLAG, '1'));

		m = new form.Map('osocks', _('osocks SOCKS5 server'),
			_('A SOCKS5 proxy for the clients of this router. Save & Apply reloads osocks: live sessions are kept.'));

		s = m.section(form.NamedSection, 'main', 'osocks');
		s.addremove = false;

		s.tab('general', _('General'));
		s.tab('users', _('Users'));
		s.tab('access', _('Access'));
		s.tab('limits', _('Limits'));
		s.tab('advanced', _('Logging and advanced'));

		/* General */
		o = s.taboption('general', form.Flag, 'enabled', _('Enabled'));
		o.default = '1';
		o.rmempty = false;

		o = s.taboption('general', widgets.NetworkSelect, 'interface', _('Interfaces'),
			_('Listen on the addresses of these interfaces, following them as they change. Never choose the WAN.'));
		o.multiple = true;
		o.nocreate = true;
		o.optional = true;

		o = s.taboption('general', form.DynamicList, 'listen', _('Listen addresses'),
			_('Fixed addresses to listen on, besides the interfaces. With neither: all addresses (0.0.0.0).'));
		o.validate = validator(check.addresses);
		o.placeholder = '192.168.1.1';

		o = s.taboption('general', form.Value, 'port', _('Port'));
		o.validate = validator(check.port);
		o.placeholder = '1080';
		o.rmempty = true;

		o = s.taboption('general', form.Value, 'workers', _('Worker processes'),
			_('1: one process. 0: one per CPU core. A new number takes effect when osocks restarts.'));
		o.validate = validator(check.count);
		o.placeholder = '1';

		/* Users */
		o = s.taboption('users', UserOption, 'user', _('Users'),
			_('With users, clients must log in (except those of the anonymous networks). Passwords are stored as PBKDF2 hashes and never shown.'));

		o = s.taboption('users', form.Value, 'user_file', _('User file'),
			_('More users, one name:password (or name:hash) a line, in a file readable by user osocks.'));
		o.placeholder = '/etc/osocks.users';

		o = s.taboption('users', form.DynamicList, 'anonymous', _('Anonymous networks'),
			_('Clients in these networks may connect without logging in.'));
		o.validate = validator(check.networks);
		o.placeholder = '192.168.1.0/24';

		o = s.taboption('users', form.Value, 'gssapi_keytab', _('GSSAPI keytab'),
			_('Offer GSSAPI (Kerberos) logins with the keys in this keytab, readable by user osocks. Needs the package python3-gssapi.'));
		o.placeholder = '/etc/osocks.keytab';

		o = s.taboption('users', form.Value, 'gssapi_service', _('GSSAPI service'),
			_('Tickets for SERVICE/host are accepted, for any host whose key is in the keytab.'));
		o.validate = validator(check.serviceName);
		o.placeholder = 'rcmd';

		o = s.taboption('users', form.ListValue, 'gssapi_min_protection', _('GSSAPI least protection'),
			_('Clients asking for less are refused.'));
		o.value('none', _('None'));
		o.value('integrity', _('Integrity'));
		o.value('confidentiality', _('Integrity and confidentiality'));
		o.default = 'none';

		o = s.taboption('users', form.ListValue, 'gssapi_max_protection', _('GSSAPI most protection'),
			_('Protected sessions cost CPU and are never spliced. curl protects nothing: choose None for it.'));
		o.value('none', _('None'));
		o.value('integrity', _('Integrity'));
		o.value('confidentiality', _('Integrity and confidentiality'));
		o.default = 'confidentiality';
		o.validate = function(section_id, value) {
			const levels = [ 'none', 'integrity', 'confidentiality' ];
			const least = this.section.formvalue(section_id, 'gssapi_min_protection') || 'none';

			return levels.indexOf(value || 'confidentiality') >= levels.indexOf(least) ||
				_('Less than the least protection');
		};

		o = s.taboption('users', form.DynamicList, 'gssapi_principal', _('GSSAPI principals'),
			_('Only these principals may log in (name@REALM, or *@REALM); none listed: every principal of the KDC.'));
		o.validate = validator(check.principal);
		o.placeholder = '*@EXAMPLE.ORG';

		/* Access */
		o = s.taboption('access', form.DynamicList, 'client_rule', _('Client rules'),
			_('Which clients may connect: "allow|deny NETWORK|all [port P[-Q],...]", first match wins, no match allows. End with "deny all" to deny by default.'));
		o.validate = validator(check.rule);
		o.placeholder = 'allow 192.168.1.0/24';

		o = s.taboption('access', form.DynamicList, 'dest_rule', _('Destination rules'),
			_('Which destinations clients may reach, in the same form, e.g. "deny 10.0.0.0/8 port 1-1023".'));
		o.validate = validator(check.rule);
		o.placeholder = 'deny 10.0.0.0/8 port 1-1023';

		o = s.taboption('access', form.Flag, 'allow_local', _('Allow this router as destination'),
			_('Destinations on loopback and on the router itself are denied unless this is set.'));
		o.default = '0';

		o = s.taboption('access', form.Value, 'bind_address', _('Outgoing address'),
			_('Source address of connections to destinations.'));
		o.validate = validator(check.address);

		o = s.taboption('access', form.Value, 'external_address', _('External address'),
			_('Address announced to BIND clients (default: the address the client reached).'));
		o.validate = validator(check.address);

		/* Limits */
		o = s.taboption('limits', form.Value, 'max_sessions', _('Session limit'),
			_('At most this many sessions at once (0: unlimited).'));
		o.validate = validator(check.count);
		o.placeholder = '0';

		o = s.taboption('limits', form.Value, 'connect_timeout', _('Connect timeout (ms)'));
		o.validate = validator(check.milliseconds);
		o.placeholder = '8000';

		o = s.taboption('limits', form.Value, 'idle_timeout', _('Idle timeout (ms)'),
			_('A session without a byte either way for this long is closed.'));
		o.validate = validator(check.milliseconds);
		o.placeholder = '64000';

		o = s.taboption('limits', form.Value, 'handshake_timeout', _('Handshake timeout (ms)'),
			_('Time for greeting, login and request.'));
		o.validate = validator(check.milliseconds);
		o.placeholder = '10000';

		o = s.taboption('limits', form.Value, 'bind_timeout', _('BIND timeout (ms)'),
			_('How long a BIND waits for its incoming connection.'));
		o.validate = validator(check.milliseconds);
		o.placeholder = '60000';

		/* Logging and advanced */
		o = s.taboption('advanced', form.ListValue, 'family', _('Destination address family'));
		o.value('any', _('IPv4 and IPv6'));
		o.value('ipv4', _('IPv4 only'));
		o.value('ipv6', _('IPv6 only'));
		o.default = 'any';

		o = s.taboption('advanced', form.Flag, 'syslog', _('Log to syslog'),
			_('Otherwise osocks logs to stderr, which procd passes to the system log.'));
		o.default = '0';

		o = s.taboption('advanced', form.ListValue, 'verbose', _('Log level'));
		o.value('-1', _('Warnings only'));
		o.value('0', _('One line per session'));
		o.value('1', _('Debug'));
		o.default = '0';

		o = s.taboption('advanced', form.Flag, 'splice', _('Relay with splice(2)'),
			_('Zero-copy relaying where the kernel allows it.'));
		o.default = '1';

		o = s.taboption('advanced', form.ListValue, 'loop', _('Event loop'),
			_('asyncio is Python\'s own, slower loop. Takes effect when osocks restarts.'));
		o.value('uvloop', 'uvloop');
		o.value('asyncio', 'asyncio');
		o.default = 'uvloop';

		return m.render();
	}
});
