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
 * Options (mosquitto.conf, after the `plugin` line of the agents' listener):
 *   plugin_opt_topic_root sekisho/v1/agents
 *   plugin_opt_inbound acks,policy,commands
 *
 * Build (Debian: gcc, mosquitto-dev, libmosquitto-dev):
 *   cc -std=c99 -O2 -Wall -Wextra -fPIC -shared -o sekisho_agent_acl.so sekisho_agent_acl.c
 * The broker resolves mosquitto_* symbols itself; nothing is linked in.
 */

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_CHANNELS 8
#define MAX_NAME 64

struct sekisho_acl {
	mosquitto_plugin_id_t *id;
	char *root;
	char *channels[MAX_CHANNELS];
	int channel_count;
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

static void free_config(struct sekisho_acl *cfg)
{
	int i;
	if(!cfg) return;
	free(cfg->root);
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

static int acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const struct sekisho_acl *cfg = userdata;
	const char *username = mosquitto_client_username(ed->client);
	const char *client_id = mosquitto_client_id(ed->client);

	(void)event;

	if(!valid_name(username) || !client_id || strcmp(username, client_id) != 0){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"sekisho_agent_acl: denied %s: client id \"%s\" is not its certificate name \"%s\"",
				ed->topic, client_id ? client_id : "", username ? username : "");
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
		if(strcmp(options[i].key, "topic_root") == 0 && !cfg->root){
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
		}else{
			rc = MOSQ_ERR_INVAL;
		}
		if(rc != MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_ERR, "sekisho_agent_acl: bad or repeated option %s", options[i].key);
			free_config(cfg);
			return rc;
		}
	}
	if(!cfg->root || cfg->channel_count == 0){
		mosquitto_log_printf(MOSQ_LOG_ERR, "sekisho_agent_acl: plugin_opt_topic_root and plugin_opt_inbound are required");
		free_config(cfg);
		return MOSQ_ERR_INVAL;
	}
	rc = mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, acl_check, NULL, cfg);
	if(rc != MOSQ_ERR_SUCCESS){
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
	if(cfg){
		mosquitto_callback_unregister(cfg->id, MOSQ_EVT_ACL_CHECK, acl_check, NULL);
		free_config(cfg);
	}
	return MOSQ_ERR_SUCCESS;
}
