# SPDX-License-Identifier: MIT
#
# osocks: this directory is the package, built from its own ./src and
# ./pyproject.toml (no download). See feeds/README.md for the feed setup.

include $(TOPDIR)/rules.mk

PKG_NAME:=osocks
# Equal to __version__ in src/osocks/__init__.py (tests/test_package.py checks)
PKG_VERSION:=0.1.0
PKG_RELEASE:=1

PKG_MAINTAINER:=osocks maintainers <maintainers@users.noreply.b-seed-fdb6a66e.example>
PKG_LICENSE:=MIT

# setuptools builds the wheel: 24.10's host Python bundles it (its python3-version.mk names
# PYTHON3_SETUPTOOLS_VERSION), later releases build it as the host package python-setuptools.
include $(TOPDIR)/feeds/packages/lang/python/python3-version.mk
PKG_BUILD_DEPENDS:=$(if $(PYTHON3_SETUPTOOLS_VERSION),,python-setuptools/host)

# python3-uvloop only with OSOCKS_UVLOOP (default y), as it is not in the packages feed
PKG_CONFIG_DEPENDS:=CONFIG_OSOCKS_UVLOOP

include $(INCLUDE_DIR)/package.mk
include $(TOPDIR)/feeds/packages/lang/python/python3-package.mk

# DEPENDS: python3-codecs for the idna codec behind every name lookup, python3-openssl for
# _hashlib (password hashes); tests/test_openwrt_imports.py holds the list against the imports
define Package/osocks
  SECTION:=net
  CATEGORY:=Network
  SUBMENU:=Web Servers/Proxies
  TITLE:=Small, fast SOCKS5 server (Python, asyncio and uvloop)
  DEPENDS:=+python3-light +python3-asyncio +python3-logging +python3-codecs +python3-openssl \
	+python3-ubus +python3-uci +OSOCKS_UVLOOP:python3-uvloop
  USERID:=osocks:osocks
endef

define Package/osocks/config
config OSOCKS_UVLOOP
	bool "Run on uvloop (python3-uvloop from this feed)"
	depends on PACKAGE_osocks
	default y
	help
	  On uvloop a small exchange beside bulk transfers waits less, and
	  BIND and UDP run on faster transports, for about 1.6 MB of flash
	  (TCP sessions cost about the same on both loops: osocks has
	  transports of its own). Without it osocks runs on the stock
	  asyncio loop (see feeds/README.md).
endef

define Package/osocks/description
  A SOCKS5 server (RFC 1928 and 1929): CONNECT, BIND and UDP ASSOCIATE,
  user/password logins, access rules for clients and destinations.
  Configured in /etc/config/osocks, it listens on the addresses of the
  chosen network interfaces; status, sessions and reload over ubus.
endef

define Package/osocks/conffiles
/etc/config/osocks
endef

define Build/Prepare
	$(INSTALL_DIR) $(PKG_BUILD_DIR)
	$(CP) ./pyproject.toml ./src $(wildcard ./README.md ./LICENSE) $(PKG_BUILD_DIR)/
endef

define Py3Package/osocks/install
	$(INSTALL_DIR) $(1)/usr/bin
	$(INSTALL_BIN) $(PKG_INSTALL_DIR)/usr/bin/osocks $(1)/usr/bin/
	$(INSTALL_DIR) $(1)/etc/init.d
	$(INSTALL_BIN) ./files/osocks.init $(1)/etc/init.d/osocks
	$(INSTALL_DIR) $(1)/etc/config
	$(INSTALL_CONF) ./files/osocks.config $(1)/etc/config/osocks
	$(INSTALL_DIR) $(1)/usr/share/rpcd/acl.d
	$(INSTALL_DATA) ./files/osocks.rpcd-acl.json $(1)/usr/share/rpcd/acl.d/osocks.json
	$(INSTALL_DIR) $(1)/usr/share/acl.d
	$(INSTALL_DATA) ./files/osocks.ubus-acl.json $(1)/usr/share/acl.d/osocks.json
endef

# ubusd reads /usr/share/acl.d when it starts and on SIGHUP
define Package/osocks/postinst
#!/bin/sh
[ -n "$${IPKG_INSTROOT}" ] || killall -HUP ubusd 2>/dev/null || true
endef

$(eval $(call Py3Package,osocks))
$(eval $(call BuildPackage,osocks))
$(eval $(call BuildPackage,osocks-src))
