// DynamoDB Local with a control port, for tests of shard lineage.
//
// DynamoDB Local gives every stream one shard and rolls it over only from a 4-hour timer that
// never fires in a test. This launcher starts the real server in this JVM and adds a loopback
// endpoint that triggers the rollover on demand:
//
//   java -cp DynamoDBLocal.jar:<this dir> ControlledServer <control port> <DynamoDB Local args...>
//   POST http://127.0.0.1:<control port>/rollover?key=<access key>
//        closes the current shard of every stream in that access key's database (each closed
//        shard gets an ending sequence number and a child naming it as parent); answers the
//        number of databases rolled over.
//
// It reaches the server's per-database handlers by reflection (their fields are private); the
// field names were read off DynamoDB Local 3.3 with javap.

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.OutputStream;
import java.lang.reflect.Field;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.Map;
import software.amazon.dynamodb.services.local.main.ServerRunner;
import software.amazon.dynamodb.services.local.server.DynamoDBProxyServer;

public final class ControlledServer {
    public static void main(String[] args) throws Exception {
        int controlPort = Integer.parseInt(args[0]);
        DynamoDBProxyServer server = ServerRunner.createServerFromCommandLineArgs(Arrays.copyOfRange(args, 1, args.length));
        server.start();
        HttpServer control = HttpServer.create(new InetSocketAddress("127.0.0.1", controlPort), 0);
        control.createContext("/rollover", exchange -> {
            try {
                String query = exchange.getRequestURI().getQuery();
                String key = query != null && query.startsWith("key=") ? query.substring(4) : "";
                if (key.isEmpty()) {
                    respond(exchange, 400, "key=<access key> is required");
                    return;
                }
                respond(exchange, 200, Integer.toString(rollover(server, key)));
            } catch (ReflectiveOperationException | RuntimeException e) {
                respond(exchange, 500, e.toString());
            }
        });
        control.start();
        System.out.println("control port " + controlPort + " ready");
    }

    /** Rolls over every stream of the databases whose credentials string starts with the key. */
    private static int rollover(DynamoDBProxyServer server, String key) throws ReflectiveOperationException {
        Object serverHandler = field(server, "serverHandler");
        Object primaryHandler = field(serverHandler, "primaryHandler");
        Map<?, ?> databases = (Map<?, ?>) field(primaryHandler, "dbRequestHandlers");
        int rolled = 0;
        synchronized (primaryHandler) {
            for (Map.Entry<?, ?> database : databases.entrySet()) {
                if (String.valueOf(database.getKey()).startsWith(key)) {
                    database.getValue().getClass().getMethod("triggerShardRollovers").invoke(database.getValue());
                    rolled++;
                }
            }
        }
        return rolled;
    }

    private static Object field(Object target, String name) throws ReflectiveOperationException {
        for (Class<?> type = target.getClass(); type != null; type = type.getSuperclass()) {
            try {
                Field field = type.getDeclaredField(name);
                field.setAccessible(true);
                return field.get(target);
            } catch (NoSuchFieldException e) {
                // declared further up
            }
        }
        throw new NoSuchFieldException(name);
    }

    private static void respond(HttpExchange exchange, int status, String body) throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        exchange.sendResponseHeaders(status, bytes.length);
        try (OutputStream out = exchange.getResponseBody()) {
            out.write(bytes);
        }
    }
}
