// The screen's state and every call into the engine, each on a background
// queue; mirrors the Android demo's DemoController (which CI runs).
import Foundation

/// One token of a heatmap, Δp scaled into [-1, 1] by the text's largest |Δp|.
struct HeatCell: Identifiable {
    let id: Int
    let text: String
    let intensity: Float
    let preferenceBearing: Bool
}

/// Stops the running training after its current step when `cancelled` is set.
final class ProgressRelay: TrainListener, @unchecked Sendable {
    private let lock = NSLock()
    private var cancelled = false
    private let onStep: (UInt64, UInt64, Float) -> Void

    init(onStep: @escaping (UInt64, UInt64, Float) -> Void) { self.onStep = onStep }

    func cancel() { lock.lock(); cancelled = true; lock.unlock() }

    func onEvent(event: TrainEvent) -> Flow {
        if case let .step(step, totalSteps, _, loss, _, _, _) = event {
            onStep(step, totalSteps, loss)
        }
        lock.lock(); defer { lock.unlock() }
        return cancelled ? .stop : .continue
    }
}

/// Hands each generated piece to the main queue.
final class TextRelay: TextListener, @unchecked Sendable {
    private let onPiece: (String) -> Void
    init(onPiece: @escaping (String) -> Void) { self.onPiece = onPiece }
    func onText(text: String) -> Flow { onPiece(text); return .continue }
}

@MainActor
final class DemoModel: ObservableObject {
    static let request = "Category: Kitchen\nProduct: Electric kettle 1.7 litre\nRating: 5/5\nReview title: Boils fast"

    @Published var status = "Loading the model…"
    @Published var users: [UserSummary] = []
    @Published var selectedUser: String?
    @Published var history: [HistoryItem] = []
    @Published var heatmap: [HeatCell] = []
    @Published var progress: Double?
    @Published var generic = ""
    @Published var personalized = ""

    private var engine: NextquillEngine?
    private var relay: ProgressRelay?
    private let work = DispatchQueue(label: "nextquill", qos: .userInitiated, attributes: .concurrent)

    init() {
        let support = FileManager.default.urls(for: .applicationSupportDirectory, in: .userDomainMask)[0]
        try? FileManager.default.createDirectory(at: support, withIntermediateDirectories: true)
        let model = Bundle.main.path(forResource: "SmolLM2-135M-Instruct.Q4_1", ofType: "gguf") ?? ""
        let users = Bundle.main.url(forResource: "demo_users", withExtension: "jsonl")
        run({
            let config = EngineConfig(threads: 2, maxHistoryItems: 4, maxResponseTokens: 64)
            let engine = try NextquillEngine.open(
                databasePath: support.appendingPathComponent("history.sqlite3").path,
                modelPath: model, config: config)
            if try engine.users().isEmpty, let users, let jsonl = try? String(contentsOf: users) {
                _ = try engine.importJsonl(jsonl: jsonl)
            }
            return (engine, try engine.users())
        }) { (engine, users) in
            self.engine = engine
            self.users = users
            self.status = "Pick a user"
        }
    }

    func select(_ user: String) {
        guard let engine else { return }
        selectedUser = user
        heatmap = []
        run({ try engine.history(userId: user) }) { self.history = $0; self.status = "\($0.count) texts by \(user)" }
    }

    func explain(_ item: HistoryItem) {
        guard let engine else { return }
        status = "Measuring what \(item.userId)'s history causes…"
        run({ try engine.explain(userId: item.userId, itemId: item.itemId) }) { explanation in
            let scale = max(explanation.tokens.map { abs($0.deltaP) }.max() ?? 1, 1e-9)
            self.heatmap = explanation.tokens.enumerated().map { index, token in
                HeatCell(id: index, text: token.text,
                         intensity: max(-1, min(1, token.deltaP / scale)),
                         preferenceBearing: token.preferenceBearing)
            }
            self.status = String(format: "%.0f%% of tokens carry the user's preference",
                                 100 * explanation.preferenceBearingShare)
        }
    }

    func personalize() {
        guard let engine, let user = selectedUser else { return }
        let relay = ProgressRelay { step, total, _ in
            DispatchQueue.main.async { self.progress = Double(step) / Double(max(total, 1)) }
        }
        self.relay = relay
        progress = 0
        let options = TrainOptions(epochs: 2, learningRate: 1e-3, warmupSteps: 2)
        run({ try engine.train(userId: user, options: options, listener: relay) }) { result in
            self.progress = nil
            switch result.outcome {
            case .activated: self.status = "Personalized in \(result.steps) steps"
            case .rejected: self.status = "The new adapter failed its check; the previous one stays"
            case .stopped: self.status = "Cancelled; the previous adapter stays active"
            }
        }
    }

    /// The cancel button; the engine stops after the current step.
    func cancel() { relay?.cancel() }

    func compare() {
        guard let engine, let user = selectedUser else { return }
        generic = ""
        personalized = ""
        let options = GenerateOptions(maxTokens: 60)
        let toGeneric = TextRelay { piece in DispatchQueue.main.async { self.generic += piece } }
        let toPersonal = TextRelay { piece in DispatchQueue.main.async { self.personalized += piece } }
        run({
            _ = try engine.generate(userId: nil, request: Self.request, options: options, listener: toGeneric)
            _ = try engine.generate(userId: user, request: Self.request, options: options, listener: toPersonal)
        }) { self.status = "Generic next to \(user)'s" }
    }

    /// Runs `call` off the main thread; a NextquillError's message lands in `status`.
    private func run<T>(_ call: @escaping () throws -> T, then: @escaping (T) -> Void) {
        work.async {
            do {
                let value = try call()
                DispatchQueue.main.async { then(value) }
            } catch {
                DispatchQueue.main.async {
                    self.progress = nil
                    self.status = "\(error)"
                }
            }
        }
    }
}
