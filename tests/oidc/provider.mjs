// A real OpenID provider for Sluice's end-to-end tests: panva's
// oidc-provider (OpenID certified) on loopback, port 0.
//
// - A public native client "sluice-cli" (no secret, PKCE required, any
//   loopback redirect port): authorization code, refresh token, device code.
// - A confidential client "sluice-ci" (secret "ci-secret"): client
//   credentials, with JWT access tokens (typ at+jwt, RFC 9068) for the
//   resource "urn:sluice" (RFC 8707), the gateway's service_audience.
// - devInteractions: login and consent forms that accept any password; the
//   login name is the account: "dana" is dana@example.com, in the groups of
//   GROUPS below (or none).
// - An RS256 key from KEY_FILE (a private JWK, made there on first start),
//   so a restarted provider keeps its key, or rotates it with a new file.
// - ID tokens carry email and groups (conformIdTokenClaims: false); their
//   lifetime is ID_TOKEN_TTL seconds (default 3600).
//
// Prints one JSON line, {"issuer": "http://127.0.0.1:PORT"}, once listening.
import http from 'node:http';
import crypto from 'node:crypto';
import fs from 'node:fs';
import Provider, { errors } from 'oidc-provider';

const GROUPS = {
  dana: ['engineering'],
  erin: ['analysts'],
  lee: ['leads'],
};

// The signing key: KEY_FILE's, or a new one written there (kid: KEY_ID).
if (!fs.existsSync(process.env.KEY_FILE)) {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: process.env.KEY_ID || 'k1', alg: 'RS256', use: 'sig' };
  fs.writeFileSync(process.env.KEY_FILE, JSON.stringify(jwk), { mode: 0o600 });
}
const key = JSON.parse(fs.readFileSync(process.env.KEY_FILE, 'utf8'));
const idTokenTtl = Number(process.env.ID_TOKEN_TTL || 3600);
const server = http.createServer();
await new Promise((resolve) => server.listen(Number(process.env.PORT || 0), '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'sluice-cli',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      redirect_uris: ['http://127.0.0.1/callback'],
      grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
      response_types: ['code'],
    },
    {
      client_id: 'sluice-ci',
      client_secret: 'ci-secret',
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
    },
  ],
  jwks: { keys: [key] },
  cookies: { keys: ['test-cookie-key'] },
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      async getResourceServerInfo(ctx, resource) {
        if (resource !== 'urn:sluice') throw new errors.InvalidTarget();
        return {
          scope: 'sluice',
          audience: 'urn:sluice',
          accessTokenTTL: idTokenTtl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  conformIdTokenClaims: false,
  scopes: ['openid', 'offline_access', 'email', 'groups'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'] },
  pkce: { required: () => true },
  // Refresh tokens for the CLI without the consent screen's offline_access.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  ttl: {
    IdToken: idTokenTtl,
    AccessToken: idTokenTtl,
    RefreshToken: 24 * 3600,
    DeviceCode: 600,
  },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: `${id}@example.com`, email_verified: true, groups: GROUPS[id] || [] };
      },
    };
  },
});
// Tests reach the provider over plain HTTP on loopback.
provider.proxy = false;
server.on('request', provider.callback());
console.log(JSON.stringify({ issuer }));
