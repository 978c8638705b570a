// The "backend session" of this example. In web banking the bank's backend
// knows the logged-in customer and holds a vcn key of role `cards` pinned to
// that customer (`vcn client add NAME --role cards --owner CUSTOMER`), and
// hands the page what it needs for the session. Here, for development only,
// the three values are read from the environment when the page is built or
// served (VCN_WEB_SERVER, VCN_WEB_API_KEY, VCN_WEB_OWNER): they end up in
// the built files, which is why dist/ and .env.local are never committed.

export interface Session {
  /** Base URL of the vcn server (gRPC-Web enabled). */
  server: string;
  /** API key sent as `authorization: Bearer …`. */
  apiKey: string;
  /** The customer reference whose cards are listed and issued. */
  owner: string;
}

/** The session, or what is missing from it. */
export function loadSession(): Session | { missing: string[] } {
  const env = import.meta.env;
  const server = env.VCN_WEB_SERVER ?? "http://127.0.0.1:50051";
  const apiKey = env.VCN_WEB_API_KEY ?? "";
  const owner = env.VCN_WEB_OWNER ?? "";
  const missing = [
    ...(apiKey ? [] : ["VCN_WEB_API_KEY"]),
    ...(owner ? [] : ["VCN_WEB_OWNER"]),
  ];
  return missing.length > 0 ? { missing } : { server, apiKey, owner };
}
