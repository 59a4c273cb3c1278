'use strict';
'require baseclass';

/*
 * The server's checks of osocks' options (src/osocks/settings.py, rules.py,
 * uci.py), done in the browser so that a value osocks would refuse at reload
 * is refused before it is saved.  Each check takes the text of one value and
 * returns true, or the message to show.  An empty value is an unset option,
 * which osocks accepts.  Where the two differ, the browser is the stricter:
 * decimal digits only in numbers, prefix lengths only in networks.
 */

const DIGITS = /^[0-9]+$/;
const HEXTET = /^[0-9a-fA-F]{1,4}$/;
const OCTET = /^(0|[1-9][0-9]{0,2})$/;

function isIPv4(text) {
	const parts = text.split('.');

	return parts.length == 4 && parts.every(p => OCTET.test(p) && +p <= 255);
}

/* Python's ipaddress.IPv6Address, step by step: '::' once, 1-4 hex digits a
 * group, an IPv4 address as the last two groups, an optional %scope. */
function isIPv6(text) {
	const percent = text.indexOf('%');
	let address = text;

	if (percent >= 0) {
		const scope = text.slice(percent + 1);

		if (scope == '' || scope.indexOf('%') >= 0)
			return false;

		address = text.slice(0, percent);
	}

	const parts = address.split(':');

	if (parts.length < 3)
		return false;

	if (parts[parts.length - 1].indexOf('.') >= 0) {
		if (!isIPv4(parts.pop()))
			return false;

		parts.push('0', '0');
	}

	if (parts.length > 9)
		return false;

	let skip = null;

	for (let i = 1; i < parts.length - 1; i++) {
		if (parts[i] == '') {
			if (skip != null)
				return false;

			skip = i;
		}
	}

	let hi, lo;

	if (skip != null) {
		hi = skip;
		lo = parts.length - skip - 1;

		if (parts[0] == '' && --hi)
			return false;

		if (parts[parts.length - 1] == '' && --lo)
			return false;

		if (8 - (hi + lo) < 1)
			return false;
	}
	else {
		if (parts.length != 8)
			return false;

		hi = 8;
		lo = 0;
	}

	return parts.slice(0, hi).every(p => HEXTET.test(p)) &&
		parts.slice(parts.length - lo).every(p => HEXTET.test(p));
}

function isAddress(text) {
	return isIPv4(text) || isIPv6(text);
}

function isNetwork(text) {
	const slash = text.indexOf('/');

	if (slash < 0)
		return isAddress(text);

	const address = text.slice(0, slash), prefix = text.slice(slash + 1);

	if (!DIGITS.test(prefix))
		return false;

	if (isIPv4(address))
		return +prefix <= 32;

	return address.indexOf('%') < 0 && isIPv6(address) && +prefix <= 128;
}

function isPortList(text) {
	return text.split(',').every(part => {
		const range = part.split('-');

		if (range.length > 2 || !range.every(p => DIGITS.test(p)))
			return false;

		const low = +range[0], high = +range[range.length - 1];

		return low > 0 && low <= high && high <= 65535;
	});
}

function words(text) {
	return text.trim().split(/\s+/).filter(w => w != '');
}

function utf8Length(text) {
	return new TextEncoder().encode(text).length;
}

return baseclass.extend({
	isAddress: isAddress,
	isNetwork: isNetwork,

	port(value) {
		if (value == '')
			return true;

		return (DIGITS.test(value) && +value <= 65535) ||
			_('Expecting a port number from 0 to 65535');
	},

	/* max_sessions, workers: 0 (unlimited, one per core) or more */
	count(value) {
		return value == '' || DIGITS.test(value) || _('Expecting a whole number, 0 or more');
	},

	/* the timeouts, in milliseconds */
	milliseconds(value) {
		return value == '' || (DIGITS.test(value) && +value > 0) ||
			_('Expecting a whole number of milliseconds, more than 0');
	},

	address(value) {
		return value == '' || isAddress(value) || _('Expecting an IPv4 or IPv6 address');
	},

	/* listen: addresses, several to an entry when separated by spaces */
	addresses(value) {
		return value == '' || words(value).every(isAddress) || _('Expecting IPv4 or IPv6 addresses');
	},

	/* anonymous: networks (CIDR) or addresses, separated by spaces */
	networks(value) {
		return value == '' || words(value).every(isNetwork) ||
			_('Expecting networks like 192.168.1.0/24 or fd00::/8, or addresses');
	},

	/* client_rule, dest_rule: allow|deny NETWORK[,NETWORK...]|all [port P[-Q][,...]] */
	rule(value) {
		if (value == '')
			return true;

		const w = words(value);
		const message = _('Expecting a rule like "allow 192.168.1.0/24", "deny all port 25" or "deny 10.0.0.0/8,fd00::/8 port 1-1023,3306"');

		if ((w.length != 2 && w.length != 4) || (w[0] != 'allow' && w[0] != 'deny'))
			return message;

		if (w[1] != 'all' && !w[1].split(',').every(isNetwork))
			return message;

		if (w.length == 4 && (w[2] != 'port' || !isPortList(w[3])))
			return message;

		return true;
	},

	/* gssapi_service: the service part of a principal (rcmd), so no '/' or '@' */
	serviceName(value) {
		return value == '' || !/[\/@ \t]/.test(value) ||
			_('Expecting a service name such as rcmd, without "/" or "@"');
	},

	/* gssapi_principal: name@REALM, or *@REALM for every principal of the realm */
	principal(value) {
		if (value == '')
			return true;

		const at = value.lastIndexOf('@');
		const who = at > 0 ? value.slice(0, at) : '';
		const realm = at >= 0 ? value.slice(at + 1) : '';

		return (who != '' && realm != '' && realm.indexOf('*') < 0 && (who == '*' || who.indexOf('*') < 0)) ||
			_('Expecting a principal like alice@EXAMPLE.ORG, or *@EXAMPLE.ORG');
	},

	/* a user name to add: RFC 1929 carries 255 bytes, and ':' ends the name in UCI */
	userName(value) {
		if (value == '')
			return _('Expecting a user name');

		if (value.indexOf(':') >= 0)
			return _('A user name cannot contain ":"');

		return utf8Length(value) <= 255 || _('A user name is 255 bytes at most');
	},

	password(value) {
		if (value == '')
			return _('Expecting a password');

		return utf8Length(value) <= 255 || _('A password is 255 bytes at most');
	}
});
