'use strict';
/*
 * The browser's side of test_luci_browser.py: one step a run, in a fresh headless Chromium
 * (Debian's, driven by playwright-core), against a real LuCI at OSOCKS_LUCI_URL.
 *
 *   node tests/luci_browser.js STEP '{"arg": ...}'   → one JSON line: what the page showed
 *
 * Needs NODE_PATH to find playwright-core and CHROMIUM (default /usr/bin/chromium).
 */
const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const BASE = process.env.OSOCKS_LUCI_URL;  /* http://127.0.0.1:PORT */
const USER = process.env.OSOCKS_LUCI_USER || 'root';
const PASSWORD = process.env.OSOCKS_LUCI_PASSWORD || '';
const TIMEOUT = 30000;
const FLAGS = [
	'--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
	'--disable-background-networking', '--disable-component-update', '--disable-sync',
	'--no-proxy-server'
];

function field(option) {
	return `[data-field="cbid.osocks.main.${option}"]`;
}

async function login(page, where) {
	await page.goto(`${BASE}/cgi-bin/luci/${where}`);
	const name = page.locator('input[name="luci_username"]');

	if (await name.count()) {
		await name.fill(USER);
		await page.locator('input[name="luci_password"]').fill(PASSWORD);
		await Promise.all([ page.waitForNavigation(), page.locator('input[name="luci_password"]').press('Enter') ]);
	}
}

async function openSettings(page, tab) {
	await login(page, 'admin/services/osocks/settings');
	await page.locator(field('port')).waitFor({ state: 'attached' });

	if (tab)
		await page.locator(`.cbi-tabmenu li[data-tab="${tab}"] a`).click();
}

/* Save & Apply, then wait for LuCI to say it is applied and reload the page */
async function saveApply(page) {
	const applied = page.waitForEvent('framenavigated', { timeout: TIMEOUT });

	await page.locator('.cbi-page-actions .cbi-button-apply').first().click();
	await page.getByText('Configuration changes applied.').waitFor({ timeout: TIMEOUT });
	await applied;
	await page.locator(field('port')).waitFor({ state: 'attached' });
}

async function reloadError(page) {
	const box = page.locator('.osocks-reload-error');

	try {
		await box.first().waitFor({ timeout: 5000 });
	}
	catch (e) {
		return null;
	}

	return box.first().innerText();
}

const STEPS = {
	async set_port(page, args) {
		await openSettings(page, 'general');
		await page.locator(`${field('port')} input`).fill(String(args.port));
		await saveApply(page);

		return {
			port: await page.locator(`${field('port')} input`).inputValue(),
			reload_error: await reloadError(page)
		};
	},

	async bad_port(page, args) {
		await openSettings(page, 'general');
		const input = page.locator(`${field('port')} input`);
		await input.fill(String(args.port));
		await input.blur();
		await page.locator('.cbi-page-actions .cbi-button-apply').first().click();
		const alert = page.locator('.modal, .alert-message').filter({ hasText: /invalid/i });
		await alert.first().waitFor({ timeout: TIMEOUT });

		if (args.screenshot)
			await page.screenshot({ path: args.screenshot, fullPage: true });

		return {
			invalid: await input.evaluate(el => el.classList.contains('cbi-input-invalid')),
			message: await alert.first().innerText(),
			changes: await page.locator('#indicators [data-indicator="uci-changes"]').count()
		};
	},

	/* a value typed into a list (client_rule, anonymous, ...): refused in the browser, or taken */
	async list_entry(page, args) {
		await openSettings(page, args.tab);
		const list = page.locator(field(args.option));
		const input = list.locator('.add-item input[type="text"]');
		await input.fill(args.value);
		await input.blur();
		const invalid = await input.evaluate(el => el.classList.contains('cbi-input-invalid'));
		await list.locator('.cbi-button-add').click();

		if (args.screenshot)
			await page.screenshot({ path: args.screenshot, fullPage: true });

		return {
			invalid: invalid,
			items: await list.locator('.item').evaluateAll(items => items.map(i => i.querySelector('input[type="hidden"]').value))
		};
	},

	async set_listen(page, args) {
		await openSettings(page, 'general');
		const list = page.locator(`${field('listen')}`);

		for (const address of args.add || []) {
			await list.locator('input[type="text"]').last().fill(address);
			await list.locator('.cbi-button-add').last().click();
		}

		for (const address of args.remove || [])
			await list.locator(`.item[data-value="${address}"] .remove, .item[data-value="${address}"]`).first().click({ position: { x: 2, y: 2 } });

		await saveApply(page);

		return { reload_error: await reloadError(page) };
	},

	async add_user(page, args) {
		await openSettings(page, 'users');
		await page.locator('input[name="osocks-new-user"]').fill(args.name);
		await page.locator('input[name="osocks-new-password"]').fill(args.password);
		await page.locator('button[name="osocks-add-user"]').click();
		await page.locator(`.osocks-user[data-user="${args.name}"]`).waitFor({ timeout: TIMEOUT });
		const filled = await page.locator('input[name="osocks-new-password"]').inputValue();

		if (args.screenshot)
			await page.screenshot({ path: args.screenshot, fullPage: true });

		await saveApply(page);
		await page.locator(`.cbi-tabmenu li[data-tab="users"] a`).click();

		return {
			users: await page.locator('.osocks-user').evaluateAll(rows => rows.map(r => r.getAttribute('data-user'))),
			password_left_in_field: filled,
			page_has_password: (await page.content()).indexOf(args.password) >= 0,
			reload_error: await reloadError(page)
		};
	},

	/* the Users tab: names, which secrets are in clear text, whether any secret is on the page; then remove some */
	async users(page, args) {
		await openSettings(page, 'users');
		await page.locator('.osocks-user').first().waitFor();
		const rows = () => page.locator('.osocks-user').evaluateAll(rs => rs.map(r => ({
			name: r.getAttribute('data-user'), clear_text: r.querySelector('.label.warning') != null
		})));
		const shown = await rows();
		const html = await page.content();

		for (const name of args.remove || [])
			await page.locator(`.osocks-user[data-user="${name}"] button[name="osocks-remove-user"]`).click();

		if ((args.remove || []).length)
			await saveApply(page);

		return {
			users: shown,
			secrets_on_page: (args.secrets || []).filter(secret => html.indexOf(secret) >= 0),
			after: await rows()
		};
	},

	async screenshot_settings(page, args) {
		await openSettings(page, args.tab || 'general');
		if (args.path)
			await page.screenshot({ path: args.path, fullPage: true });

		return { title: await page.locator('h2').first().innerText() };
	},

	async sessions(page, args) {
		await login(page, 'admin/services/osocks/status');
		const rows = page.locator('#osocks-sessions tr[data-id]');
		await rows.first().waitFor({ timeout: TIMEOUT });

		if (args.wait_points) {  /* polls, each a point of the throughput graph */
			await page.waitForFunction(n => {
				const line = document.querySelector('#osocks-line-up');
				return line && line.getAttribute('points').split(' ').length >= n;
			}, args.wait_points, { timeout: TIMEOUT });
		}

		if (args.screenshot)
			await page.screenshot({ path: args.screenshot, fullPage: true });

		const found = await rows.evaluateAll(trs => trs.map(tr => ({
			id: tr.getAttribute('data-id'),
			cells: Array.from(tr.querySelectorAll('td')).map(td => td.innerText.trim())
		})));

		if (args.disconnect) {
			await page.locator(`#osocks-sessions tr[data-id="${args.disconnect}"] button[name="osocks-disconnect"]`).click();
			await page.locator(`#osocks-sessions tr[data-id="${args.disconnect}"]`).waitFor({ state: 'detached', timeout: TIMEOUT });
		}

		const graph = await page.locator('#osocks-line-up').getAttribute('points');

		return {
			sessions: found,
			graph_heights: graph.split(' ').filter(p => p).map(p => +p.split(',')[1]),
			summary: await page.locator('#osocks-summary').innerText(),
			workers: await page.locator('#osocks-workers tr').count()
		};
	},

	async stopped(page, args) {
		await login(page, 'admin/services/osocks/status');
		const state = page.locator('#osocks-state');
		await state.waitFor({ timeout: TIMEOUT });

		return { state: await state.innerText(), sessions: await page.locator('#osocks-sessions').count() };
	},

	async overview(page, args) {
		await login(page, 'admin/status/overview');
		const box = page.locator('#osocks-overview');
		await box.waitFor({ timeout: TIMEOUT });

		return { text: await box.innerText() };
	}
};

async function main() {
	const [ step, json ] = process.argv.slice(2);
	const args = JSON.parse(json || '{}');
	const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'osocks-chromium-'));
	const context = await chromium.launchPersistentContext(profile, {
		executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
		headless: true,
		args: FLAGS,
		viewport: { width: 1280, height: 900 }
	});
	const errors = [];

	try {
		const page = context.pages()[0] || await context.newPage();
		page.setDefaultTimeout(TIMEOUT);
		page.on('pageerror', err => errors.push(String(err)));
		const result = await STEPS[step](page, args);
		result.page_errors = errors;
		process.stdout.write(JSON.stringify(result) + '\n');
	}
	finally {
		await context.close();
		fs.rmSync(profile, { recursive: true, force: true });
	}
}

main().catch(err => {
	process.stderr.write(String(err && err.stack || err) + '\n');
	process.exit(1);
});
