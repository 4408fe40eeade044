/*
 * sekisho_agent_acl: a mosquitto 2.0 plugin (plugin interface v5) for the agents' listener.
 *
 * mosquitto's acl_file grants every SUBSCRIBE and only checks the read rules when a message is delivered.
 * That lets an agent join the controllers' shared subscription ($share/controllers/...): the broker then
 * assigns part of the events to the agent, the delivery check drops them, and they never reach a controller.
 * This plugin decides SUBSCRIBE on the agents' listener instead: an agent may subscribe to exactly its own
 * inbound topics, TOPIC_ROOT/<its username>/<channel> for a channel in INBOUND, and nothing else (no
 * wildcard, no $share, no other agent's topic). Publishing and delivery are left to the acl_file.
 *
 * It also fails closed when the listener does not bind the client id to the certificate
 * (use_username_as_clientid): a client whose id differs from its username gets no access at all.
 *
 * Identity and revocation. The listener runs with use_identity_as_username false, so that mosquitto asks this
 * plugin at every CONNECT (MOSQ_EVT_BASIC_AUTH; with use_identity_as_username no plugin is asked). The plugin
 * takes the certificate's CN as the identity: the client must send it as its username (mosquitto then makes it
 * the client id too), and the certificate must not be revoked. Revocations are read from a file (the
 * controller writes it, see protocol/revocations.py):
 *
 *   sekisho-revocations 1
 *   name term-07                      every certificate with this CN is refused (agent revoked)
 *   serial 5A0F...C3 term-03          this one certificate is refused (agent replaced or re-enrolled)
 *   end 2                             the number of entries: a truncated file is refused
 *
 * The file is checked at most every RECHECK_MS (on every tick where mosquitto sends them, on ACL checks, on
 * CONNECT) and re-read when it changed (inode, size or mtime); a SIGHUP (MOSQ_EVT_RELOAD) re-reads it at once,
 * and mosquitto then re-authenticates every connected client through this plugin. Newly revoked agents are
 * disconnected at once (mosquitto_kick_client_by_*); a revoked client is refused at CONNECT, and denied and
 * disconnected at any ACL check.
 *
 * Failure modes (fail closed): until a good list has been read, every agent is refused (missing, unreadable,
 * malformed or over MAX_LIST_BYTES / MAX_ENTRIES). Once one has, a later bad or missing file keeps the last
 * good list in force (and is logged once): a revocation already applied is never lifted by a broken write,
 * and a broken write cannot take every agent on the site off the broker either.
 *
 * Options (mosquitto.conf, after the `plugin` line of the agents' listener):
 *   plugin_opt_topic_root sekisho/v1/agents
 *   plugin_opt_inbound acks,policy,commands
 *   plugin_opt_revocations /etc/mosquitto/sekisho/revocations
 *
 * Sites mode (the central broker's sites listener, where site brokers' bridges connect):
 *   plugin_opt_mode sites
 * The same acl_file gap exists there: a site certificate could join the controllers' $share group and take a
 * share of every site's events. In this mode the plugin refuses every SUBSCRIBE to a $ topic ($share, $SYS)
 * or a filter with a wildcard (a bridge subscribes to its agents' exact topics only) and leaves every other
 * decision, exact topics included, to the listener's acl_file, which gives each site its own agents' topics.
 * Identity stays with the listener (use_identity_as_username); no other option is taken in this mode.
 *
 * Build (Debian: gcc, mosquitto-dev, libmosquitto-dev, libssl-dev):
 *   cc -std=c99 -O2 -Wall -Wextra -fPIC -shared -o sekisho_agent_acl.so sekisho_agent_acl.c
 * The broker resolves mosquitto_* and OpenSSL symbols itself; nothing is linked in.
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_CHANNELS 8
#define MAX_NAME 64
/* Bounds on the revocation list: a file beyond them is refused as a whole (fail closed, see above). */
#define MAX_LIST_BYTES (8L * 1024 * 1024)
#define MAX_ENTRIES 100000
#define MAX_SERIAL 64
#define RECHECK_MS 500
#define LIST_MAGIC "sekisho-revocations 1"

struct serial_entry {
	char *serial;
	char *name;
};

struct revocations {
	char **names;                 /* sorted */
	size_t name_count;
	struct serial_entry *serials; /* sorted by serial */
	size_t serial_count;
	char **serial_names;          /* sorted, the names that have a revoked serial */
	size_t serial_name_count;
};

struct sekisho_acl {
	mosquitto_plugin_id_t *id;
	bool sites;                   /* plugin_opt_mode sites: only SUBSCRIBE filters are checked */
	char *root;
	char *channels[MAX_CHANNELS];
	int channel_count;
	char *list_path;
	struct revocations list;
	bool loaded;                  /* a good list has been read */
	bool failing;                 /* the last attempt failed (logged once until it changes) */
	struct timespec checked_at;
	dev_t dev;
	ino_t ino;
	off_t size;
	struct timespec mtime;
	bool seen;                    /* dev/ino/size/mtime describe the file last attempted */
};

static char *copy_string(const char *text, size_t len)
{
	char *out = malloc(len + 1);
	if(out){
		memcpy(out, text, len);
		out[len] = '\0';
	}
	return out;
}

static void free_list(struct revocations *list)
{
	size_t i;
	for(i = 0; i < list->name_count; i++) free(list->names[i]);
	for(i = 0; i < list->serial_count; i++){
		free(list->serials[i].serial);
		free(list->serials[i].name);
	}
	/* serial_names point into serials[].name */
	free(list->names);
	free(list->serials);
	free(list->serial_names);
	memset(list, 0, sizeof(*list));
}

static void free_config(struct sekisho_acl *cfg)
{
	int i;
	if(!cfg) return;
	free(cfg->root);
	free(cfg->list_path);
	free_list(&cfg->list);
	for(i = 0; i < cfg->channel_count; i++){
		free(cfg->channels[i]);
	}
	free(cfg);
}

/* An agent name as the sekisho PKI issues it: [a-z0-9][a-z0-9_-]{0,62}. Anything else (wildcards,
 * '/', '$', an empty name) could widen the topic built from it, so it gets no access. */
static bool valid_name(const char *name)
{
	size_t i, len;
	if(!name) return false;
	len = strlen(name);
	if(len == 0 || len > MAX_NAME - 1) return false;
	for(i = 0; i < len; i++){
		char c = name[i];
		bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (i > 0 && (c == '-' || c == '_'));
		if(!ok) return false;
	}
	return true;
}

/* Whether `filter` is exactly ROOT/<name>/<channel> for one of the configured channels. */
static bool own_inbound(const struct sekisho_acl *cfg, const char *name, const char *filter)
{
	size_t root_len = strlen(cfg->root);
	size_t name_len = strlen(name);
	int i;

	if(strncmp(filter, cfg->root, root_len) != 0 || filter[root_len] != '/') return false;
	filter += root_len + 1;
	if(strncmp(filter, name, name_len) != 0 || filter[name_len] != '/') return false;
	filter += name_len + 1;
	for(i = 0; i < cfg->channel_count; i++){
		if(strcmp(filter, cfg->channels[i]) == 0) return true;
	}
	return false;
}

/* --- the revocation list ------------------------------------------------------------------------------ */

static int compare_text(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static int compare_serial(const void *a, const void *b)
{
	return strcmp(((const struct serial_entry *)a)->serial, ((const struct serial_entry *)b)->serial);
}

static bool has_name(char *const *names, size_t count, const char *name)
{
	return count > 0 && bsearch(&name, names, count, sizeof(char *), compare_text) != NULL;
}

static bool has_serial(const struct revocations *list, const char *serial)
{
	struct serial_entry key;
	key.serial = (char *)serial;
	key.name = NULL;
	return list->serial_count > 0
		&& bsearch(&key, list->serials, list->serial_count, sizeof(key), compare_serial) != NULL;
}

/* A certificate serial as OpenSSL's BN_bn2hex writes it: upper-case hexadecimal, whole bytes, no leading
 * zero byte ("0" for zero). */
static bool valid_serial(const char *text)
{
	size_t i, len = strlen(text);
	if(strcmp(text, "0") == 0) return true;
	if(len == 0 || len > MAX_SERIAL || len % 2 != 0 || (text[0] == '0' && text[1] == '0')) return false;
	for(i = 0; i < len; i++){
		if(!((text[i] >= '0' && text[i] <= '9') || (text[i] >= 'A' && text[i] <= 'F'))) return false;
	}
	return true;
}

/* Parse a whole list (NUL-terminated, no NUL inside) into `out`; return NULL or what is wrong with it. */
static const char *parse_list(char *text, struct revocations *out)
{
	size_t cap_names = 0, cap_serials = 0, entries = 0, i;
	bool magic = false, ended = false;
	char *line, *next;

	memset(out, 0, sizeof(*out));
	for(line = text; line && *line; line = next){
		char *word, *arg, *extra, *save = NULL;
		next = strchr(line, '\n');
		if(next) *next++ = '\0';
		if(ended) return "text after the end line";
		if(line[0] == '#' || line[0] == '\0') continue;
		if(!magic){
			if(strcmp(line, LIST_MAGIC) != 0) return "first line is not \"" LIST_MAGIC "\"";
			magic = true;
			continue;
		}
		word = strtok_r(line, " ", &save);
		arg = word ? strtok_r(NULL, " ", &save) : NULL;
		extra = arg ? strtok_r(NULL, " ", &save) : NULL;
		if(!word || !arg) return "line without a value";
		if(strcmp(word, "end") == 0){
			char *stop;
			unsigned long count;
			if(extra) return "end line with more than a count";
			errno = 0;
			count = strtoul(arg, &stop, 10);
			if(errno || *stop || count != entries) return "entry count in the end line does not match";
			ended = true;
			continue;
		}
		if(++entries > MAX_ENTRIES) return "too many entries";
		if(strcmp(word, "name") == 0){
			if(extra || !valid_name(arg)) return "bad name line";
			if(out->name_count == cap_names){
				char **grown;
				cap_names = cap_names ? cap_names * 2 : 64;
				grown = realloc(out->names, cap_names * sizeof(char *));
				if(!grown) return "out of memory";
				out->names = grown;
			}
			out->names[out->name_count] = strdup(arg);
			if(!out->names[out->name_count]) return "out of memory";
			out->name_count++;
		}else if(strcmp(word, "serial") == 0){
			char *name = extra, *more = extra ? strtok_r(NULL, " ", &save) : NULL;
			if(!valid_serial(arg) || !name || more || !valid_name(name)) return "bad serial line";
			if(out->serial_count == cap_serials){
				struct serial_entry *grown;
				cap_serials = cap_serials ? cap_serials * 2 : 64;
				grown = realloc(out->serials, cap_serials * sizeof(*grown));
				if(!grown) return "out of memory";
				out->serials = grown;
			}
			out->serials[out->serial_count].serial = strdup(arg);
			out->serials[out->serial_count].name = strdup(name);
			out->serial_count++;
			if(!out->serials[out->serial_count - 1].serial || !out->serials[out->serial_count - 1].name){
				return "out of memory";
			}
		}else{
			return "unknown entry kind";
		}
	}
	if(!magic) return "empty file";
	if(!ended) return "no end line (truncated?)";
	if(out->name_count) qsort(out->names, out->name_count, sizeof(char *), compare_text);
	if(out->serial_count){
		qsort(out->serials, out->serial_count, sizeof(*out->serials), compare_serial);
		out->serial_names = malloc(out->serial_count * sizeof(char *));
		if(!out->serial_names) return "out of memory";
		for(i = 0; i < out->serial_count; i++) out->serial_names[i] = out->serials[i].name;
		qsort(out->serial_names, out->serial_count, sizeof(char *), compare_text);
		out->serial_name_count = out->serial_count;
	}
	return NULL;
}

/* Read the list file into `out`; return NULL or why not. */
static const char *read_list(const char *path, struct revocations *out, struct stat *st)
{
	FILE *fh;
	char *text;
	size_t got;
	const char *problem;

	memset(out, 0, sizeof(*out));
	fh = fopen(path, "rb");
	if(!fh) return errno == ENOENT ? "missing" : "unreadable";
	if(fstat(fileno(fh), st) != 0 || !S_ISREG(st->st_mode)){
		fclose(fh);
		return "not a regular file";
	}
	if(st->st_size > MAX_LIST_BYTES){
		fclose(fh);
		return "larger than the bound (8 MiB)";
	}
	text = malloc((size_t)st->st_size + 1);
	if(!text){
		fclose(fh);
		return "out of memory";
	}
	got = fread(text, 1, (size_t)st->st_size, fh);
	fclose(fh);
	if(got != (size_t)st->st_size){
		free(text);
		return "short read";
	}
	text[got] = '\0';
	if(strlen(text) != got){
		free(text);
		return "NUL byte in the file";
	}
	problem = parse_list(text, out);
	free(text);
	if(problem) free_list(out);
	return problem;
}

static long elapsed_ms(const struct timespec *since, const struct timespec *now)
{
	return (long)(now->tv_sec - since->tv_sec) * 1000 + (now->tv_nsec - since->tv_nsec) / 1000000;
}

/* Disconnect the clients the new list revokes and the old one did not. Safe from any plugin callback:
 * mosquitto only marks them disconnected; their contexts are freed later by the main loop. */
static void kick_newly_revoked(const struct revocations *old, const struct revocations *fresh)
{
	size_t i;
	for(i = 0; i < fresh->name_count; i++){
		if(!has_name(old->names, old->name_count, fresh->names[i])){
			mosquitto_kick_client_by_username(fresh->names[i], false);
		}
	}
	for(i = 0; i < fresh->serial_count; i++){
		if(!has_serial(old, fresh->serials[i].serial)){
			/* The client id is the certificate's name (use_username_as_clientid) and one client id has one
			 * connection: the replaced certificate's, or the new one's, which reconnects at once. */
			mosquitto_kick_client_by_clientid(fresh->serials[i].name, false);
		}
	}
}

/* Re-read the list if it changed (at most every RECHECK_MS unless forced). */
static void refresh_list(struct sekisho_acl *cfg, bool force)
{
	struct timespec now;
	struct stat st;
	struct revocations fresh;
	const char *problem;

	clock_gettime(CLOCK_MONOTONIC, &now);
	if(!force && cfg->checked_at.tv_sec != 0 && elapsed_ms(&cfg->checked_at, &now) < RECHECK_MS) return;
	cfg->checked_at = now;
	if(stat(cfg->list_path, &st) != 0){
		if(!cfg->failing){
			mosquitto_log_printf(MOSQ_LOG_ERR, "sekisho_agent_acl: revocation list %s %s: %s", cfg->list_path,
					errno == ENOENT ? "missing" : "unreadable",
					cfg->loaded ? "keeping the last good list" : "refusing every agent until it can be read");
		}
		cfg->failing = true;
		cfg->seen = false;
		return;
	}
	if(!force && cfg->seen && st.st_dev == cfg->dev && st.st_ino == cfg->ino && st.st_size == cfg->size
			&& st.st_mtim.tv_sec == cfg->mtime.tv_sec && st.st_mtim.tv_nsec == cfg->mtime.tv_nsec){
		return;
	}
	problem = read_list(cfg->list_path, &fresh, &st);
	cfg->seen = true;
	cfg->dev = st.st_dev;
	cfg->ino = st.st_ino;
	cfg->size = st.st_size;
	cfg->mtime = st.st_mtim;
	if(problem){
		mosquitto_log_printf(MOSQ_LOG_ERR, "sekisho_agent_acl: revocation list %s refused (%s): %s", cfg->list_path,
				problem, cfg->loaded ? "keeping the last good list" : "refusing every agent until a good list is written");
		cfg->failing = true;
		return;
	}
	if(cfg->loaded) kick_newly_revoked(&cfg->list, &fresh);
	free_list(&cfg->list);
	cfg->list = fresh;
	if(cfg->failing || !cfg->loaded){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "sekisho_agent_acl: revocation list %s read again", cfg->list_path);
	}
	cfg->loaded = true;
	cfg->failing = false;
	mosquitto_log_printf(MOSQ_LOG_INFO, "sekisho_agent_acl: revocation list: %lu agent(s), %lu certificate(s) revoked",
			(unsigned long)cfg->list.name_count, (unsigned long)cfg->list.serial_count);
}

/* Write the certificate's serial as the list does into `out` (MAX_SERIAL + 1 bytes); false if it cannot. */
static bool certificate_serial(X509 *cert, char *out)
{
	BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get_serialNumber(cert), NULL);
	char *hex;
	bool ok = false;
	if(!bn) return false;
	hex = BN_bn2hex(bn);
	if(hex && strlen(hex) <= MAX_SERIAL){
		strcpy(out, hex);
		ok = true;
	}
	OPENSSL_free(hex);
	BN_free(bn);
	return ok;
}

/* Why this client's certificate is refused, or NULL. `name` is its (already checked) username. */
static const char *revocation_of(struct sekisho_acl *cfg, const struct mosquitto *client, const char *name)
{
	X509 *cert;
	char serial[MAX_SERIAL + 1];
	bool revoked;

	if(!cfg->loaded) return "no revocation list read yet";
	if(has_name(cfg->list.names, cfg->list.name_count, name)) return "agent revoked";
	if(!has_name(cfg->list.serial_names, cfg->list.serial_name_count, name)) return NULL;
	cert = mosquitto_client_certificate(client);
	if(!cert) return "no certificate";
	revoked = !certificate_serial(cert, serial) || has_serial(&cfg->list, serial);
	X509_free(cert);
	return revoked ? "certificate revoked (replaced)" : NULL;
}

/* The certificate's CN, copied into `out` (MAX_NAME bytes), or false (none, too long, embedded NUL). */
static bool certificate_name(const struct mosquitto *client, char *out)
{
	X509 *cert = mosquitto_client_certificate(client);
	X509_NAME *subject;
	X509_NAME_ENTRY *entry;
	ASN1_STRING *data;
	int index, len;
	bool ok = false;

	if(!cert) return false;
	subject = X509_get_subject_name(cert);
	index = subject ? X509_NAME_get_index_by_NID(subject, NID_commonName, -1) : -1;
	/* Exactly one CN: with two, which one mosquitto and OpenSSL tools show differs. */
	if(index >= 0 && X509_NAME_get_index_by_NID(subject, NID_commonName, index) < 0){
		entry = X509_NAME_get_entry(subject, index);
		data = entry ? X509_NAME_ENTRY_get_data(entry) : NULL;
		len = data ? ASN1_STRING_length(data) : -1;
		if(len > 0 && len < MAX_NAME){
			memcpy(out, ASN1_STRING_get0_data(data), (size_t)len);
			out[len] = '\0';
			ok = strlen(out) == (size_t)len;
		}
	}
	X509_free(cert);
	return ok;
}

static int basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	struct sekisho_acl *cfg = userdata;
	char name[MAX_NAME];
	const char *refusal;

	(void)event;
	refresh_list(cfg, false);
	/* Never MOSQ_ERR_PLUGIN_DEFER: with no password file mosquitto would then let any username in. */
	if(!certificate_name(ed->client, name) || !valid_name(name)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "sekisho_agent_acl: refused a client whose certificate has no valid agent name");
		return MOSQ_ERR_AUTH;
	}
	if(!ed->username || strcmp(ed->username, name) != 0){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"sekisho_agent_acl: refused %s: username \"%s\" is not its certificate name", name,
				ed->username ? ed->username : "");
		return MOSQ_ERR_AUTH;
	}
	refusal = revocation_of(cfg, ed->client, name);
	if(refusal){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "sekisho_agent_acl: refused %s: %s", name, refusal);
		return MOSQ_ERR_AUTH;
	}
	return MOSQ_ERR_SUCCESS;
}

static int acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	struct sekisho_acl *cfg = userdata;
	const char *username = mosquitto_client_username(ed->client);
	const char *client_id = mosquitto_client_id(ed->client);
	const char *refusal;

	(void)event;

	if(!valid_name(username) || !client_id || strcmp(username, client_id) != 0){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"sekisho_agent_acl: denied %s: client id \"%s\" is not its certificate name \"%s\"",
				ed->topic, client_id ? client_id : "", username ? username : "");
		return MOSQ_ERR_ACL_DENIED;
	}
	refresh_list(cfg, false);
	refusal = revocation_of(cfg, ed->client, username);
	if(refusal){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "sekisho_agent_acl: denied %s to %s and disconnected it: %s",
				ed->topic, username, refusal);
		mosquitto_kick_client_by_clientid(client_id, false);
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access != MOSQ_ACL_SUBSCRIBE){
		/* Publishing and delivery: the acl_file decides. */
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	if(own_inbound(cfg, username, ed->topic)){
		return MOSQ_ERR_SUCCESS;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "sekisho_agent_acl: denied SUBSCRIBE to %s from %s", ed->topic, username);
	return MOSQ_ERR_ACL_DENIED;
}

/* Sites mode: a bridge subscribes to exact agent topics; a $ topic or a wildcard filter is never one. */
static int acl_check_sites(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *username;

	(void)event;
	(void)userdata;
	if(ed->access != MOSQ_ACL_SUBSCRIBE) return MOSQ_ERR_PLUGIN_DEFER;
	if(ed->topic && ed->topic[0] != '$' && !strpbrk(ed->topic, "+#")) return MOSQ_ERR_PLUGIN_DEFER;
	username = mosquitto_client_username(ed->client);
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "sekisho_agent_acl: denied SUBSCRIBE to %s from site bridge %s",
			ed->topic ? ed->topic : "", username ? username : "");
	return MOSQ_ERR_ACL_DENIED;
}

static int init_sites(mosquitto_plugin_id_t *identifier, void **userdata, struct sekisho_acl *cfg)
{
	int rc = mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, acl_check_sites, NULL, cfg);
	if(rc != MOSQ_ERR_SUCCESS){
		free_config(cfg);
		return rc;
	}
	*userdata = cfg;
	mosquitto_log_printf(MOSQ_LOG_INFO, "sekisho_agent_acl: site bridges subscribe to exact topics only (no $, no wildcard)");
	return MOSQ_ERR_SUCCESS;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	refresh_list(userdata, false);
	return MOSQ_ERR_SUCCESS;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	/* SIGHUP: read the list now; mosquitto then re-authenticates every client through basic_auth. */
	refresh_list(userdata, true);
	return MOSQ_ERR_PLUGIN_DEFER;
}

static int parse_channels(struct sekisho_acl *cfg, const char *value)
{
	const char *start = value;
	while(*start){
		const char *end = strchr(start, ',');
		size_t len = end ? (size_t)(end - start) : strlen(start);
		size_t i;
		if(len == 0 || len >= MAX_NAME || cfg->channel_count == MAX_CHANNELS) return MOSQ_ERR_INVAL;
		for(i = 0; i < len; i++){
			if(start[i] < 'a' || start[i] > 'z') return MOSQ_ERR_INVAL;
		}
		cfg->channels[cfg->channel_count] = copy_string(start, len);
		if(!cfg->channels[cfg->channel_count]) return MOSQ_ERR_NOMEM;
		cfg->channel_count++;
		if(!end) break;
		start = end + 1;
		if(!*start) return MOSQ_ERR_INVAL;
	}
	return cfg->channel_count > 0 ? MOSQ_ERR_SUCCESS : MOSQ_ERR_INVAL;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *options, int option_count)
{
	struct sekisho_acl *cfg;
	int i, rc;

	cfg = calloc(1, sizeof(*cfg));
	if(!cfg) return MOSQ_ERR_NOMEM;
	cfg->id = identifier;
	for(i = 0; i < option_count; i++){
		if(strcmp(options[i].key, "mode") == 0 && i == 0 && option_count == 1 && strcmp(options[i].value, "sites") == 0){
			cfg->sites = true;
			rc = MOSQ_ERR_SUCCESS;
		}else if(strcmp(options[i].key, "topic_root") == 0 && !cfg->root){
			size_t len = strlen(options[i].value);
			/* A concrete topic prefix: no wildcard, no leading or trailing '/', not a $ topic. */
			if(len == 0 || strpbrk(options[i].value, "+#") || options[i].value[0] == '/'
					|| options[i].value[0] == '$' || options[i].value[len - 1] == '/'){
				rc = MOSQ_ERR_INVAL;
			}else{
				cfg->root = copy_string(options[i].value, len);
				rc = cfg->root ? MOSQ_ERR_SUCCESS : MOSQ_ERR_NOMEM;
			}
		}else if(strcmp(options[i].key, "inbound") == 0 && cfg->channel_count == 0){
			rc = parse_channels(cfg, options[i].value);
		}else if(strcmp(options[i].key, "revocations") == 0 && !cfg->list_path && options[i].value[0] == '/'){
			cfg->list_path = copy_string(options[i].value, strlen(options[i].value));
			rc = cfg->list_path ? MOSQ_ERR_SUCCESS : MOSQ_ERR_NOMEM;
		}else{
			rc = MOSQ_ERR_INVAL;
		}
		if(rc != MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_ERR, "sekisho_agent_acl: bad or repeated option %s", options[i].key);
			free_config(cfg);
			return rc;
		}
	}
	if(cfg->sites) return init_sites(identifier, userdata, cfg);
	if(!cfg->root || cfg->channel_count == 0 || !cfg->list_path){
		mosquitto_log_printf(MOSQ_LOG_ERR, "sekisho_agent_acl: plugin_opt_topic_root, plugin_opt_inbound and "
				"plugin_opt_revocations (an absolute path) are required");
		free_config(cfg);
		return MOSQ_ERR_INVAL;
	}
	refresh_list(cfg, true);
	rc = mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, acl_check, NULL, cfg);
	if(rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(identifier, MOSQ_EVT_BASIC_AUTH, basic_auth, NULL, cfg);
	/* mosquitto 2.0.11 sends no ticks to per-listener plugins (later versions do); reload and ACL checks do. */
	if(rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(identifier, MOSQ_EVT_TICK, on_tick, NULL, cfg);
	if(rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(identifier, MOSQ_EVT_RELOAD, on_reload, NULL, cfg);
	if(rc != MOSQ_ERR_SUCCESS){
		mosquitto_callback_unregister(identifier, MOSQ_EVT_ACL_CHECK, acl_check, NULL);
		mosquitto_callback_unregister(identifier, MOSQ_EVT_BASIC_AUTH, basic_auth, NULL);
		mosquitto_callback_unregister(identifier, MOSQ_EVT_TICK, on_tick, NULL);
		free_config(cfg);
		return rc;
	}
	*userdata = cfg;
	mosquitto_log_printf(MOSQ_LOG_INFO, "sekisho_agent_acl: agents subscribe to %s/<name>/{%d inbound channels} only",
			cfg->root, cfg->channel_count);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	struct sekisho_acl *cfg = userdata;

	(void)options;
	(void)option_count;
	if(cfg && cfg->sites){
		mosquitto_callback_unregister(cfg->id, MOSQ_EVT_ACL_CHECK, acl_check_sites, NULL);
		free_config(cfg);
	}else if(cfg){
		mosquitto_callback_unregister(cfg->id, MOSQ_EVT_ACL_CHECK, acl_check, NULL);
		mosquitto_callback_unregister(cfg->id, MOSQ_EVT_BASIC_AUTH, basic_auth, NULL);
		mosquitto_callback_unregister(cfg->id, MOSQ_EVT_TICK, on_tick, NULL);
		mosquitto_callback_unregister(cfg->id, MOSQ_EVT_RELOAD, on_reload, NULL);
		free_config(cfg);
	}
	return MOSQ_ERR_SUCCESS;
}
